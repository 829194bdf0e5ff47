"""The private path's accuracy against its serving cost: one MLP, the five-member ensemble
(the default), smaller ensembles, and one MLP distilled from the ensemble, side by side on the
same seeds. Cross-fitted dev accuracy of each, per task and as a mean over tasks.

    python scripts/private_head_ensembles.py [--seeds 3] [--first-seed 0] [--decontaminate]
        [--variants five_small,three,kd_own,kd_all,kd_mix] [--loss soft|mse]

Every head is fitted on the frozen config's cached features and standardization, with the
config's `routing.private` settings and training's per-task seed (`seed * 1000 + task index`),
and scored as `scripts/private_head_calibration.py` scores it (`score`: the epoch picked on
one half of dev, scored on the other, mean over halvings). Variants:

- `one`, `five` (always): `routing.private.members` 1 and 5, as training fits them;
- `five_small`: five members of 256 -> 128 (about 2x one MLP's weights, not 5x);
- `three`: three members of the default layout;
- `kd_own`: one MLP learns `five`'s mean-logit probabilities (soft cross-entropy; `--loss mse`
  matches the logits instead) on the task's own training features, 20 epochs;
- `kd_all`: the same on every task's training features (about 5x the rows), 5 epochs;
- `kd_mix`: on its own rows plus 3x as many drawn from every task's, 10 epochs.
A student's epoch is picked on dev like every head's; `agree` is how often its answer equals
the ensemble's on dev.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from private_head_calibration import score  # scripts/, beside this file
from private_head_sweep import add_data_arguments, task_features

from pipeline.model import private_head
from pipeline.routing import correct, fit_private_head


def distil(args, cfg, rows, teacher, classes, xd, seed, epochs) -> np.ndarray:  # noqa: ANN001
    """One MLP trained on `teacher`'s answers for `rows`; its dev logits per epoch [E, m, C]."""
    torch.manual_seed(seed + 7)
    student = private_head(rows.shape[1], classes, cfg.hidden_sizes, cfg.dropout)
    with torch.no_grad():
        target = teacher.eval()(rows)
    opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    n = len(rows)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-n // cfg.batch_size))
    gen = torch.Generator().manual_seed(seed)
    per_epoch = []
    for _ in range(epochs):
        student.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            out = student(rows[idx])
            if args.loss == "soft":
                loss = -(F.softmax(target[idx], -1) * F.log_softmax(out, -1)).sum(-1).mean()
            else:
                loss = F.mse_loss(out, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            per_epoch.append(student.eval()(xd).numpy().astype(np.float64))
    return np.stack(per_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--variants", default="five_small,three,kd_own,kd_all,kd_mix")
    parser.add_argument("--loss", choices=["soft", "mse"], default="soft")
    args = parser.parse_args()
    variants = args.variants.split(",")
    config, feats = task_features(args)
    cfg = config.routing.private
    every = torch.cat([feats[t][0] for t in config.task_names])
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        start = time.monotonic()
        for i, t in enumerate(config.task_names):
            x, y, xd, yd = feats[t]
            classes = int(max(y.max(), yd.max())) + 1
            ms = seed * 1000 + i
            res: dict[str, np.ndarray] = {}
            fitted = {}
            for name, hidden, k in (
                ("one", cfg.hidden_sizes, 1),
                ("five", cfg.hidden_sizes, 5),
                ("five_small", [256, 128], 5),
                ("three", cfg.hidden_sizes, 3),
            ):
                if name not in ("one", "five") and name not in variants:
                    continue
                torch.manual_seed(ms)
                head = private_head(x.shape[1], classes, hidden, cfg.dropout, members=k)
                head_cfg = cfg.model_copy(update={"hidden_sizes": list(hidden)})
                _, logits = fit_private_head(head, x, y, head_cfg, ms, dev=(xd, yd))
                res[name], fitted[name] = logits.astype(np.float64), head
            ens = fitted["five"]
            if "kd_own" in variants:
                res["kd_own"] = distil(args, cfg, x, ens, classes, xd, ms, cfg.epochs)
            if "kd_all" in variants:
                res["kd_all"] = distil(args, cfg, every, ens, classes, xd, ms, cfg.epochs // 4)
            if "kd_mix" in variants:
                g = torch.Generator().manual_seed(ms)
                extra = every[torch.randperm(len(every), generator=g)[: 3 * len(x)]]
                mixed = torch.cat([x, extra])
                res["kd_mix"] = distil(args, cfg, mixed, ens, classes, xd, ms, cfg.epochs // 2)
            labels = yd.numpy()
            with torch.no_grad():
                ens_dev = ens.eval()(xd).numpy()
            for name, logits in res.items():
                r = score("accuracy", logits, labels, seed)
                if name.startswith("kd"):
                    e = int(np.argmax(correct(logits, labels).sum(1)))
                    r["agree"] = 100 * float((logits[e].argmax(-1) == ens_dev.argmax(-1)).mean())
                rows.setdefault((t, name), []).append(r)
        print(f"seed {seed}: {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    print(f"{'task':<6} {'variant':<10} {'xfit acc':>8} {'dev acc':>8} {'agree':>6}")
    for (t, name), rs in rows.items():
        agree = np.mean([r.get("agree", np.nan) for r in rs])
        print(
            f"{t:<6} {name:<10} {np.mean([r['crossfit_accuracy'] for r in rs]):8.2f} "
            f"{np.mean([r['accuracy'] for r in rs]):8.2f} {agree:6.1f}"
        )
    for name in dict.fromkeys(n for _, n in rows):
        per_seed = np.mean(
            [[r["crossfit_accuracy"] for r in rs] for (_, n), rs in rows.items() if n == name],
            axis=0,
        )
        print(
            f"mean   {name:<10} xfit acc {per_seed.mean():.2f}  per seed "
            + " ".join(f"{v:.2f}" for v in per_seed)
        )


if __name__ == "__main__":
    main()
