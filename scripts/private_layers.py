"""Would a private copy of a fine-tuned encoder's top blocks close a task's gap to its own
fine-tuned model? A diagnostic for issue 13's fine-tuned per-task target.

With a fine-tuned encoder, a task's private path (`routing.private`) reads the jointly
fine-tuned encoder's features: it protects the task from the shared module B, not from the
shared encoder. On senteval6-finetune SUBJ stays 0.6-0.9 below its single-task model on every
seed with either path (docs/results.md, *Routing*). This script measures, on a stored
fine-tuned run, what a task gains from its own copy of the top `--layers` blocks, trained on
the task alone with a fresh private head:

    python scripts/private_layers.py RUN_DIR [--tasks subj,cr] [--layers 1]
        [--init joint|pretrained] [--epochs N] [--head private|single]

Per task: the cached token states of the run's frozen bottom blocks (the token-state cache;
computed once when missing), the run's own fine-tuned blocks up to the copy (fixed), then the
copy, mean pooling, the run's standardization and a private head of the run's
`routing.private` layout, trained together: AdamW, the copy at `optim.encoder_lr`, the head at
`routing.private.lr`, warmup then cosine, batches of `train.batch_size` bucketed by length,
label smoothing as the private head's; the epoch with the most dev items right is kept, as the
private head's is. `--init joint` starts the copy from the run's jointly fine-tuned blocks,
`pretrained` from the encoder's original ones. `--head single` trains the single-task
model's head instead (a fresh B and tower of the run's `shared` and `towers` layout, plain
cross-entropy, at `optim.lr`): with `--layers` equal to the fine-tuned blocks and `--init
pretrained`, the layout of the task's single-task model.

Printed per task: the run's shared and private paths (recomputed through the stored model),
the copy's dev accuracy and epoch, the rule's choice between the copy and the shared path
(`pipeline.routing.decide`, with its cross-fitted estimates), the copy against the stored
private path (paired difference and its standard error), and the time. Nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np


def batches_in_length_order(lengths: np.ndarray, size: int):  # noqa: ANN201
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), size):
        yield order[i : i + size]


def measure(
    run_dir: Path,
    task_names: list[str] | None,
    k: int,
    init: str,
    epochs: int | None,
    head_kind: str = "private",
) -> dict[str, dict[str, float | str | None]]:
    """Per task measured (see the module docstring): accuracies in percent."""
    import torch
    import torch.nn.functional as F

    from pipeline.data import load_tasks
    from pipeline.model import build_heads, load_encoder, private_head, transformer_layers
    from pipeline.own_path import pad_states
    from pipeline.routing import correct, decide, paired_difference
    from pipeline.runs import load_run
    from pipeline.token_cache import TokenStateCache
    from pipeline.train.driver import check_overlap
    from pipeline.train.loop import lr_factor
    from pipeline.train.sampler import bucketed_batches

    run = load_run(run_dir)
    config, enc = run.config, run.record.encoder
    encoder, heads = run.model.encoder.eval(), run.model.heads.eval()
    n_layers = len(transformer_layers(encoder.transformer))
    cached = enc.cached_layers
    if not cached:
        raise SystemExit(f"{run_dir}: not a partially fine-tuned run (no cached token states)")
    if not 1 <= k <= n_layers - cached:
        raise SystemExit(f"--layers: 1 to {n_layers - cached} (the run's fine-tuned blocks)")
    start_block = n_layers - k  # the copy's first block
    pcfg = config.routing.private
    epochs = epochs or config.train.epochs
    tasks = load_tasks(config, labels=run.labels)
    check_overlap(config, tasks)  # decontaminates when the run did
    cache = TokenStateCache(
        config.resolved_cache_dir(), enc.path, cached, enc.max_length, encoder=encoder
    )
    seed = config.train.seed
    out: dict[str, dict[str, float | str | None]] = {}
    for index, t in enumerate(tasks):
        if task_names and t.name not in task_names:
            continue
        began = time.monotonic()
        # The states entering the copy, per row (fp32, real tokens only); the shared and stored
        # private paths' dev answers from the run's own top blocks.
        inputs, labels, shared_right, stored_right = {}, {}, None, None
        for split in ("train", "dev"):
            entry = cache.get(t.splits[split].texts, desc=f"token states {t.name}/{split}")
            rows_out: list[torch.Tensor | None] = [None] * len(entry)
            pooled = torch.zeros(len(entry), encoder.dim)
            with torch.inference_mode():
                for rows in batches_in_length_order(entry.lengths, 256):
                    states, mask = (torch.from_numpy(a) for a in entry.batch(rows))
                    h = encoder.run_layers(states, mask, cached, start_block)
                    if split == "dev":
                        top = encoder.run_layers(h, mask, start_block)
                        pooled[rows] = encoder.pool(top, mask)
                    for j, row in enumerate(rows):
                        rows_out[row] = h[j, : int(entry.lengths[row])].clone()
            inputs[split] = rows_out
            labels[split] = torch.as_tensor(np.asarray(t.splits[split].labels))
            if split == "dev":
                with torch.no_grad():
                    y = labels["dev"]
                    shared_right = (heads(pooled, t.name, path="shared")[0].argmax(-1) == y).numpy()
                    stored_right = (
                        heads(pooled, t.name, path="private")[0].argmax(-1) == y
                    ).numpy()

        # The copy: a whole encoder object whose blocks below `start_block` are never run.
        own = copy.deepcopy(encoder) if init == "joint" else load_encoder(enc.path, enc.pooling)
        own.set_trainable_layers(k)
        torch.manual_seed(seed * 1000 + index)
        n_classes = len(run.labels[t.name])
        if head_kind == "private":
            head = private_head(
                encoder.dim, n_classes, pcfg.hidden_sizes, pcfg.dropout, pcfg.members
            )
            head_params, head_lr, decay = list(head.parameters()), pcfg.lr, pcfg.weight_decay
            smoothing = pcfg.label_smoothing

            def logits_of(pooled: torch.Tensor, members: bool = False, head=head) -> torch.Tensor:
                x = heads.standardize(pooled)
                return head.member_logits(x) if members else head(x)  # [K, B, C] or [B, C]

        else:  # the single-task model's layout: B and the task's tower, plain cross-entropy
            off = config.aux.model_copy(update={"enabled": False})
            head = build_heads(encoder.dim, {t.name: n_classes}, config.shared, config.towers, off)
            head.set_feature_stats(heads.feature_mean, heads.feature_std)
            head_params = [*head.shared.parameters(), *head.towers[t.name].parameters()]
            head_lr, decay, smoothing = config.optim.lr, config.optim.weight_decay, 0.0

            def logits_of(
                pooled: torch.Tensor, members: bool = False, head=head, task: str = t.name
            ) -> torch.Tensor:
                return head(pooled, task, path="shared")[0]

        layer_params = [p for p in own.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [
                {"params": layer_params, "lr": config.optim.encoder_lr},
                {"params": head_params, "lr": head_lr},
            ],
            weight_decay=decay,
        )
        n_train = len(inputs["train"])
        lengths = np.array([r.shape[0] for r in inputs["train"]])
        steps_per_epoch = -(-n_train // config.train.batch_size)
        total = epochs * steps_per_epoch
        ocfg = config.optim
        ratio = (
            ocfg.warmup_ratio if ocfg.encoder_warmup_ratio is None else ocfg.encoder_warmup_ratio
        )
        warmup = int(ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_factor(config.optim.schedule, warmup, total)
        )
        batches = bucketed_batches(lengths, config.train.batch_size, seed, 0, index, 0, 1)
        members = getattr(head, "members", 1) if head_kind == "private" else 1
        per_epoch: list[np.ndarray] = []
        for epoch in range(epochs):
            own.train()
            head.train()
            for _ in range(steps_per_epoch):
                idx = next(batches)
                x, mask = pad_states([inputs["train"][i] for i in idx])
                pooled = own.pool(own.run_layers(x, mask, start_block), mask)
                y = labels["train"][idx]
                if members > 1:  # every member on the same rows: one pass through the copy
                    logits = logits_of(pooled, members=True)  # [K, B, C]
                    loss = F.cross_entropy(
                        logits.flatten(0, 1), y.repeat(members), label_smoothing=smoothing
                    )
                else:
                    loss = F.cross_entropy(logits_of(pooled), y, label_smoothing=smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
            own.eval()
            head.eval()
            dev_logits = np.zeros((len(inputs["dev"]), len(run.labels[t.name])), np.float32)
            with torch.inference_mode():
                dev_lengths = np.array([r.shape[0] for r in inputs["dev"]])
                for rows in batches_in_length_order(dev_lengths, 256):
                    x, mask = pad_states([inputs["dev"][i] for i in rows])
                    pooled = own.pool(own.run_layers(x, mask, start_block), mask)
                    dev_logits[rows] = logits_of(pooled).numpy()
            per_epoch.append(dev_logits)
            right = correct(dev_logits, labels["dev"].numpy())
            print(
                f"  {t.name} epoch {epoch + 1}: dev {100 * right.mean():.2f} "
                f"({time.monotonic() - began:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
        per_epoch_right = correct(np.stack(per_epoch), labels["dev"].numpy())  # [E, n]
        d = decide(shared_right, per_epoch_right, config.routing.margin_se, seed)
        best = per_epoch_right[(d.private_epoch or 1) - 1]
        diff, se = paired_difference(stored_right, best)
        out[t.name] = {
            "shared": 100 * float(shared_right.mean()),
            "stored_private": 100 * float(stored_right.mean()),
            "own": d.private_accuracy,
            "own_epoch": d.private_epoch,
            "path": d.path,
            "routed": d.chosen_accuracy,
            "routed_crossfit": d.crossfit_accuracy,
            "own_crossfit": d.private_crossfit_accuracy,
            "own_minus_stored": diff,
            "own_minus_stored_se": se,
            "seconds": time.monotonic() - began,
        }
        r = out[t.name]
        print(
            f"{t.name}: shared {r['shared']:.2f}, private (stored) {r['stored_private']:.2f}, "
            f"own {k} block(s) ({init}, {head_kind} head) {d.private_accuracy:.2f} at epoch {d.private_epoch}; "
            f"rule vs shared: {d.path} (routed {d.chosen_accuracy:.2f}, cross-fitted "
            f"{d.crossfit_accuracy:.2f}; own blocks cross-fitted "
            f"{d.private_crossfit_accuracy:.2f}); own - stored private {diff:+.2f} "
            f"(SE {se:.2f}); {r['seconds']:.0f}s",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a stored partially fine-tuned routed run")
    parser.add_argument("--tasks", default="", help="comma-separated (default: every task)")
    parser.add_argument("--layers", type=int, default=1, help="top blocks copied (default 1)")
    parser.add_argument("--init", choices=("joint", "pretrained"), default="joint")
    parser.add_argument("--epochs", type=int, default=None, help="default: the run's")
    parser.add_argument(
        "--head",
        choices=("private", "single"),
        default="private",
        help="the run's private head layout (default), or the single-task model's: B and a tower",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [x for x in args.tasks.split(",") if x] or None
    measure(args.run_dir, names, args.layers, args.init, args.epochs, args.head)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
