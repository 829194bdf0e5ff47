"""Dev accuracy of private heads (pipeline/routing.py) with a few settings, on the frozen
config's cached features, beside nothing else: a diagnostic for choosing `routing.private`.

    python scripts/private_head_sweep.py [--decontaminate]

Prints one line per setting: each task's dev accuracy and the average. Each head is fitted as
training fits it (fit_private_head: its epoch picked on dev, or on 10% of the train split for
the `holdout` settings), one thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.config import PrivateHeadConfig, RunConfig, load_config
from pipeline.data import decontaminate, load_tasks
from pipeline.features import resolve_encoder_path
from pipeline.model import private_head
from pipeline.routing import fit_private_head
from pipeline.train.driver import feature_stats, prepare_inputs

GRID = {
    "512-256 d0.3, dev pick (default)": PrivateHeadConfig(),
    "512-256 d0.3, holdout pick": PrivateHeadConfig(select="holdout"),
    "256 d0.1, holdout pick (before)": PrivateHeadConfig(
        hidden_sizes=[256], dropout=0.1, weight_decay=1e-4, batch_size=128, select="holdout"
    ),
    "linear, dev pick": PrivateHeadConfig(hidden_sizes=[], dropout=0.1),
}


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/senteval6.yaml")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--decontaminate", action="store_true")


def task_features(
    args: argparse.Namespace,
) -> tuple[RunConfig, dict[str, tuple[torch.Tensor, ...]]]:
    """The config and, per task, standardized train features, train labels, standardized dev
    features and dev labels, as training computes them (cache, standardization, decontamination)."""
    torch.set_num_threads(1)
    config = load_config(args.config, data_dir=args.data_dir)
    tasks = load_tasks(config)
    if args.decontaminate:
        decontaminate(tasks)
    full = {(t.name, n): s for t in tasks for n, s in t.splits.items()}
    enc = resolve_encoder_path(config.encoder.path, config.encoder.allow_download)
    inputs = prepare_inputs(config, tasks, enc, full)
    mean, std = (torch.tensor(a) for a in feature_stats(config, inputs))
    std = std.clamp(min=1e-6)
    out = {}
    for t in config.task_names:
        tr, dv = inputs.train[t], inputs.dev[t]
        x, y = (torch.tensor(tr.features) - mean) / std, torch.tensor(tr.labels)
        xd, yd = (torch.tensor(dv.features) - mean) / std, torch.tensor(dv.labels)
        out[t] = (x, y, xd, yd)
    return config, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    config, features = task_features(parser.parse_args())
    for name, cfg in GRID.items():
        start, accs = time.monotonic(), {}
        for i, t in enumerate(config.task_names):
            x, y, xd, yd = features[t]
            torch.manual_seed(0)
            head = private_head(x.shape[1], int(y.max()) + 1, cfg.hidden_sizes, cfg.dropout)
            fit_private_head(head, x, y, cfg, seed=i, dev=(xd, yd))
            with torch.no_grad():
                accs[t] = 100 * float((head(xd).argmax(-1) == yd).float().mean())
        per_task = " ".join(f"{t} {a:.2f}" for t, a in accs.items())
        took = time.monotonic() - start
        print(f"{name:<26} {per_task} | avg {np.mean(list(accs.values())):.2f} | {took:.0f}s")


if __name__ == "__main__":
    main()
