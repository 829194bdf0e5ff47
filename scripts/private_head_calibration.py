"""Private heads (pipeline/routing.py) under a few training recipes and epoch-pick rules, side
by side on the same seeds: accuracy and calibration after temperature scaling.

    python scripts/private_head_calibration.py [--seeds 4] [--decontaminate]
        [--recipe NAME:ls=F:k=K ...] [--rules accuracy,nll]

Each head is fitted as training fits it (`fit_private_head`, the config's `routing.private`
with the recipe's label smoothing `ls`; `k` > 1 averages the logits of k heads fitted with
different seeds) on the frozen config's cached features and standardization. Per epoch-pick
rule (`accuracy`: most dev items right, as training picks; `nll`: lowest dev NLL) it prints,
per task and as means over seeds:

- the picked epoch, dev accuracy (picked on all of dev: optimistic), cross-fitted accuracy;
- T and dev ECE before scaling at the picked epoch;
- cross-fitted ECE after scaling, as the artifact's is measured (`pipeline.calibration`: dev
  in 2 halves, one ECE over both) but with the epoch pick inside the fold too: each half is
  scored at the epoch and temperature picked on the other half; mean over 10 halvings;
- its worst seed.

Default recipes: `base` (ls=0, the session-7 default) and `ls01` (ls=0.1, the default now).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from private_head_sweep import add_data_arguments, task_features  # scripts/, beside this file

from pipeline.calibration import ece_of_logits, fit_temperature, nll
from pipeline.model import private_head
from pipeline.routing import correct, fit_private_head, halvings

HALVINGS = 10


def pick(rule: str, logits: np.ndarray, labels: np.ndarray) -> tuple[int, float]:
    """(epoch index, temperature fitted on these items at that epoch) for per-epoch logits
    [E, m, C] under `rule`."""
    if rule == "accuracy":
        e = int(np.argmax(correct(logits, labels).sum(axis=1)))
    elif rule == "nll":
        e = int(np.argmin([nll(z, labels) for z in logits]))
    else:
        raise ValueError(f"unknown rule {rule!r}: accuracy or nll")
    return e, fit_temperature(logits[e], labels)


def score(rule: str, logits: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """One head's (or ensemble's) row for a rule; module docstring."""
    e, t = pick(rule, logits, labels)
    accs, eces = [], []
    pairs = list(halvings(len(labels), seed, HALVINGS))
    for a, b in pairs[::2]:  # each halving once; both halves are scored below
        scaled = np.empty_like(logits[0], dtype=np.float64)
        for fit_half, scored_half in ((a, b), (b, a)):
            ea, ta = pick(rule, logits[:, fit_half], labels[fit_half])
            scaled[scored_half] = logits[ea, scored_half] / ta
        accs.append(100 * float(correct(scaled, labels).mean()))
        eces.append(ece_of_logits(scaled, labels))
    return {
        "epoch": e + 1,
        "accuracy": 100 * float(correct(logits[e], labels).mean()),
        "crossfit_accuracy": float(np.mean(accs)),
        "temperature": t,
        "ece_before": ece_of_logits(logits[e], labels),
        "crossfit_ece_after": float(np.mean(eces)),
    }


def parse_recipe(spec: str) -> tuple[str, float, int]:
    name, *opts = spec.split(":")
    o = dict(opt.split("=", 1) for opt in opts)
    return name, float(o.get("ls", 0.0)), int(o.get("k", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--recipe", action="append", default=[])
    parser.add_argument("--rules", default="accuracy,nll")
    args = parser.parse_args()
    recipes = [parse_recipe(r) for r in args.recipe or ["base:ls=0", "ls01:ls=0.1"]]
    rules = args.rules.split(",")
    config, features = task_features(args)
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        start = time.monotonic()
        for i, t in enumerate(config.task_names):
            x, y, xd, yd = features[t]
            classes = int(max(y.max(), yd.max())) + 1
            for name, smoothing, k in recipes:
                cfg = config.routing.private.model_copy(update={"label_smoothing": smoothing})
                members = []
                for j in range(k):
                    member_seed = seed * 1000 + i + 100_000 * j  # training's: seed * 1000 + i
                    torch.manual_seed(member_seed)
                    head = private_head(x.shape[1], classes, cfg.hidden_sizes, cfg.dropout)
                    _, logits = fit_private_head(head, x, y, cfg, member_seed, dev=(xd, yd))
                    members.append(logits.astype(np.float64))
                logits = np.mean(members, axis=0)
                for rule in rules:
                    key = (t, f"{name}/{rule}")
                    rows.setdefault(key, []).append(score(rule, logits, yd.numpy(), seed))
        print(f"seed {seed}: {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    print(
        f"{'task':<6} {'recipe/rule':<16} {'epoch':>5} {'dev acc':>8} {'xfit acc':>8} "
        f"{'T':>5} {'ECE T=1':>7} {'xfit ECE after':>14} {'worst':>6}  "
        f"(means over {args.seeds} seeds)"
    )
    for (task, variant), rs in rows.items():
        m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
        print(
            f"{task:<6} {variant:<16} {m['epoch']:5.1f} {m['accuracy']:8.2f} "
            f"{m['crossfit_accuracy']:8.2f} {m['temperature']:5.2f} {m['ece_before']:7.2f} "
            f"{m['crossfit_ece_after']:14.2f} {max(r['crossfit_ece_after'] for r in rs):6.2f}"
        )
    for variant in dict.fromkeys(v for _, v in rows):
        per_task = [rs for (_, v), rs in rows.items() if v == variant]
        acc = np.mean([[r["crossfit_accuracy"] for r in rs] for rs in per_task])
        ece = [np.mean([r["crossfit_ece_after"] for r in rs]) for rs in per_task]
        worst = max(r["crossfit_ece_after"] for rs in per_task for r in rs)
        print(
            f"mean   {variant:<16} xfit acc {acc:.2f}, xfit ECE after {np.mean(ece):.2f}, "
            f"worst task {max(ece):.2f}, worst task and seed {worst:.2f}"
        )


if __name__ == "__main__":
    main()
