"""Refit the routing stage of a transfer suite's stored routed runs with today's routing
settings, and compare each task's answer with its single-task model.

A diagnostic for `routing.private`, for when retraining is what costs: the routing stage runs
after stage 2, on the final encoder's features, and changes neither the encoder nor the shared
path. So refitting it on a stored run gives what a fresh run with the new settings would
choose, but for the random draws (the private heads' initialization) and without retraining
anything else. It is not a rerun of the suite: the report says so.

    python scripts/reroute.py runs/experiments/s9-routed-finetune [--members 5]
        [--private-layers 3,4,5]

`--private-layers` refits the private heads on the final features plus the pooled output of
these blocks (`routing.private.layers`; fine-tuned runs, blocks from the cached ones up), with
the standardization a fresh run would use: the stored one for the final features, and for
the added columns the statistics of the initial encoder on the run's stats sample
(`pipeline.train.driver.feature_stats`).

For each seed's `runs/routed-s<seed>`: the pooled train and dev features of the run's
encoder (a fine-tuned encoder's top layers run on the cached token states of its frozen bottom
layers, as training ran them), the private heads fitted as `pipeline.train.loop`'s routing
stage fits them, and the path chosen by `pipeline.routing.decide`. Printed per task: the
single-task model (the suite's `results/single-<task>-s<seed>.json`), the shared path, the
stored private path, the refitted one, and the refitted routed answer minus the single-task
model (mean ± std over seeds). Given one run's directory instead of a suite, the same for
that run alone, without the single-task column. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np


def pooled(run, split, cache) -> np.ndarray:  # noqa: ANN001 (pipeline types, imported late)
    """[n, out_dim] pooled features of `split`'s texts under the run's encoder."""
    import torch

    enc = run.record.encoder
    encoder = run.model.encoder.eval()
    if cache is None:  # frozen (the feature cache), or fine-tuned from token ids
        from pipeline.evaluate import run_features

        return run_features(run, split.texts, "features")
    entry = cache.get(split.texts)
    order = np.argsort(entry.lengths, kind="stable")
    out = np.zeros((len(entry), encoder.out_dim), np.float32)
    with torch.inference_mode():
        for i in range(0, len(order), 256):
            rows = order[i : i + 256]
            states, mask = entry.batch(rows)
            x = encoder.forward_from(
                torch.from_numpy(states), torch.from_numpy(mask), enc.cached_layers
            )
            out[rows] = x.numpy()
    return out


def widen_heads(run, tasks, cache, layers: list[int]):  # noqa: ANN001, ANN201
    """The run's heads for private heads on [final | pooled `layers`]: every stored tensor
    but the private heads, the standardization extended with the initial encoder's statistics
    of the added columns on the stats sample training draws."""
    import torch

    from pipeline.model import build_heads, load_encoder
    from pipeline.train.driver import sampled_cached_features, stats_sample

    config, enc = run.config, run.record.encoder
    if cache is None:
        raise SystemExit("--private-layers: a partially fine-tuned run (cached token states)")
    encoder = run.model.encoder
    try:
        encoder.set_pooled_layers(layers)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if encoder.pooled_layers[0] < enc.cached_layers:
        raise SystemExit(f"--private-layers: blocks from {enc.cached_layers} up (the cached ones)")
    initial = load_encoder(enc.path, enc.pooling).eval()
    initial.set_pooled_layers(layers)
    sample = stats_sample(tasks, config.train.seed)
    x = np.concatenate(
        [
            sampled_cached_features(
                initial,
                (cache.get(t.splits["train"].texts), None),
                sample[t.name],
                enc.cached_layers,
            )
            for t in tasks
        ]
    )[:, enc.dim :]
    old = run.model.heads
    rcfg = config.routing.private.model_copy(update={"layers": list(layers)})
    heads = build_heads(
        enc.dim,
        {t: len(v) for t, v in run.labels.items()},
        config.shared,
        config.towers,
        config.aux,
        rcfg,
    )
    kept = {
        k: v
        for k, v in old.state_dict().items()
        if not k.startswith("private.") and k not in ("feature_mean", "feature_std")
    }
    heads.load_state_dict(kept, strict=False)
    heads.set_feature_stats(
        torch.cat([old.feature_mean[: enc.dim], torch.from_numpy(x.mean(0))]),
        torch.cat([old.feature_std[: enc.dim], torch.from_numpy(x.std(0))]),
    )
    heads.routes = dict(old.routes)
    run.model.heads = heads.eval()
    return heads


def reroute(
    run_dir: Path,
    members: int | None,
    layers: list[int] | None = None,
    only: list[str] | None = None,
) -> dict[str, dict[str, float | str]]:
    """Per task: shared, stored private and refitted private dev accuracy, and the refitted
    path."""
    import torch

    from pipeline.data import load_tasks
    from pipeline.model import private_head
    from pipeline.routing import route_task
    from pipeline.runs import load_run
    from pipeline.token_cache import TokenStateCache
    from pipeline.train.driver import check_overlap

    run = load_run(run_dir)
    config = run.config
    rcfg = config.routing
    private_cfg = rcfg.private.model_copy(
        update={"members": members if members is not None else type(rcfg.private)().members}
    )
    tasks = load_tasks(config, labels=run.labels)
    check_overlap(config, tasks)  # decontaminates when the run did
    enc = run.record.encoder
    cache = None
    if enc.cached_layers:
        cache = TokenStateCache(
            config.resolved_cache_dir(),
            enc.path,
            enc.cached_layers,
            enc.max_length,
            encoder=run.model.encoder,
        )
    heads = run.model.heads
    if layers:
        heads = widen_heads(run, tasks, cache, layers)
        private_cfg = private_cfg.model_copy(update={"layers": list(layers)})
    seed = config.train.seed
    rcfg = rcfg.model_copy(update={"private": private_cfg})
    out: dict[str, dict[str, float | str]] = {}
    for i, t in enumerate(tasks):
        if only and t.name not in only:
            continue
        start = time.monotonic()
        x, xd = (torch.from_numpy(pooled(run, t.splits[s], cache)) for s in ("train", "dev"))
        y = torch.as_tensor(np.asarray(t.splits["train"].labels))
        yd = torch.as_tensor(np.asarray(t.splits["dev"].labels))
        torch.manual_seed(seed * 1000 + i)  # the new head's initialization
        heads.private[t.name] = private_head(
            x.shape[1],
            len(run.labels[t.name]),
            private_cfg.hidden_sizes,
            private_cfg.dropout,
            private_cfg.members,
        )
        d, _ = route_task(heads, t.name, (x, y), (xd, yd), rcfg, seed, i)
        stored = run.record.routing[t.name]
        out[t.name] = {
            "shared": d.shared_accuracy,
            "stored_private": stored.private_accuracy,
            "private": d.private_accuracy,
            "path": d.path,
            "routed": d.chosen_accuracy,
        }
        print(
            f"  {run_dir.name} {t.name}: shared {d.shared_accuracy:.2f}, private "
            f"{stored.private_accuracy:.2f} -> {d.private_accuracy:.2f}, {d.path} "
            f"({time.monotonic() - start:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "suite_dir",
        type=Path,
        help="a transfer suite run with --variants routed, or one routed run's directory",
    )
    parser.add_argument(
        "--members", type=int, default=None, help="private ensemble size (default: the config's)"
    )
    parser.add_argument(
        "--private-layers",
        default="",
        help="comma-separated blocks whose pooled output the private heads also read "
        "(routing.private.layers); default: the run's",
    )
    parser.add_argument(
        "--tasks", default="", help="one run's directory: only these tasks (comma-separated)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    only = [x for x in args.tasks.split(",") if x.strip()] or None
    try:
        layers = [int(x) for x in args.private_layers.split(",") if x.strip()]
    except ValueError:
        print(
            f"--private-layers: integers, e.g. 3,4,5 (got {args.private_layers!r})", file=sys.stderr
        )
        return 2
    if (args.suite_dir / "run.json").is_file():  # one run: its paths, no single-task models
        res = reroute(args.suite_dir, args.members, layers, only)
        print(f"routing refitted on {args.suite_dir}")
        print("| task | shared | private (stored) | private (refitted) | path | routed |")
        print("|:---|---:|---:|---:|:---|---:|")
        for t, r in res.items():
            print(
                f"| {t} | {r['shared']:.2f} | {r['stored_private']:.2f} | {r['private']:.2f} "
                f"| {r['path']} | {r['routed']:.2f} |"
            )
        return 0
    if only:
        print(
            "--tasks: for one run's directory (a suite's table needs every task)", file=sys.stderr
        )
        return 2
    runs = sorted((args.suite_dir / "runs").glob("routed-s*"))
    if not runs:
        print(f"{args.suite_dir}: no runs/routed-s* directories", file=sys.stderr)
        return 2
    per_seed = {}
    for run_dir in runs:
        s = run_dir.name.removeprefix("routed-s")
        per_seed[s] = reroute(run_dir, args.members, layers)
    tasks = list(next(iter(per_seed.values())))
    print(f"routing refitted on {len(runs)} stored run(s) of {args.suite_dir}")
    print(
        "| task | single-task | shared | private (stored) | private (refitted) | private chosen "
        "| routed − single |"
    )
    print("|:---|---:|---:|---:|---:|---:|---:|")
    worst, gaps = [], []
    for t in tasks:
        single, rows = [], []
        for s, res in per_seed.items():
            result = json.loads((args.suite_dir / "results" / f"single-{t}-s{s}.json").read_text())
            single.append(result["dev"][t])
            rows.append(res[t])
        delta = [r["routed"] - a for r, a in zip(rows, single, strict=True)]
        best = max(np.mean(single), np.mean([r["shared"] for r in rows]))
        gaps.append(np.mean([r["routed"] for r in rows]) - best)
        worst.append((np.mean(delta), t))

        def ms(v: list[float]) -> str:
            return f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}"

        print(
            f"| {t} | {ms(single)} | {ms([r['shared'] for r in rows])} "
            f"| {ms([r['stored_private'] for r in rows])} | {ms([r['private'] for r in rows])} "
            f"| {sum(r['path'] == 'private' for r in rows)}/{len(rows)} | {np.mean(delta):+.2f} "
            f"± {np.std(delta, ddof=1) if len(delta) > 1 else 0:.2f} |"
        )
    low, task = min(worst)
    print(
        f"average: {np.mean(gaps):+.2f} against the better of single-task and shared (seed "
        f"means; target ≥ −0.2); worst task: {task} {low:+.2f} against its single-task model "
        "(target ≥ −0.5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
