"""The GPU path, run for real on one CUDA GPU: what CPU-only CI cannot exercise.

Four checks, in order of importance, each writing its numbers as soon as it ends:

1. **Selection.** torch sees the GPU; `select_precision("auto", ...)` picks bf16 there;
   onnxruntime's providers and `serving.runtime.choose_providers` on them.
2. **Parity.** Pooled features of dev texts from the encoder on the GPU (fp32, and under the
   bf16 autocast that training uses) against a float64 CPU reference: ||out - ref|| / ||ref||.
   Then one training step (loss and gradients) on the GPU under bf16 against the CPU in fp32.
3. **Throughput.** `pipeline.features.encode_texts` over the training texts on the GPU, fp32 and
   bf16 autocast: texts/s and achieved TFLOP/s (FLOPs from the real token counts, as
   bench/serve.py counts them), beside a bf16 and an fp32 matmul measured in the same run.
4. **Training.** The real per-worker loop (`pipeline.train.loop.run_stages`: joint stage,
   covariance alignment, routing with the private ensembles, final selection, checkpoints) on
   the GPU with the config's own settings, the data prepared by the driver's own functions.
   The selected checkpoint is then loaded on the CPU and evaluated in fp32: a GPU-trained
   model must give the CPU (where export and serving run) the same dev answers.

Ray Train is not used: the lent GPU machine has no Ray and cannot install it (no network, and
its wheel is over the tool's transfer limit); `train_loop_per_worker` differs from step 4 only
in taking its rank, device and checkpoint from Ray. The same holds for onnxruntime-gpu.

Usage (on a machine with a CUDA GPU):
    python bench/gpu_path.py --encoder DIR --data-root DIR [--config configs/senteval6-finetune.yaml]
        [--set key=value ...] [--out DIR] [--budget-s 420]
Without a GPU it runs every check it can on the CPU (useful to test the script), and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("gpu_path")


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


class Report:
    """Results as they come: printed, and rewritten to OUT/gpu_path.json after each check."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        print(f"== {key}: {json.dumps(value, default=str)}", flush=True)
        (self.out / "gpu_path.json").write_text(json.dumps(self.data, indent=1, default=str))


# ------------------------------------------------------------------------------ 1. selection
def check_selection(device) -> dict[str, Any]:
    import torch

    from pipeline.train.device import select_precision
    from serving.runtime import choose_providers

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=bf16,
        )
    out["precision_auto"] = select_precision("auto", device.type, bf16)
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
        out.update(
            onnxruntime=ort.__version__,
            ort_providers=available,
            chosen_auto=choose_providers("auto", available),
        )
    except ImportError as err:
        out["onnxruntime"] = f"not importable: {err}"
    return out


# -------------------------------------------------------------------------------- 2. parity
def check_parity(
    encoder_dir: str, texts: list[str], device, max_length: int, pooling: str = "mean"
) -> dict[str, Any]:
    import copy

    import torch

    from pipeline.features import load_tokenizer, tokenize
    from pipeline.model import load_encoder
    from pipeline.train.device import autocast_context

    tok = load_tokenizer(encoder_dir)
    ids, mask = tokenize(tok, texts, max_length)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    enc = load_encoder(encoder_dir, pooling, "all").eval()
    with torch.no_grad():
        ref = copy.deepcopy(enc).double()(ids_t, mask_t).numpy()
        cpu32 = enc(ids_t, mask_t).numpy()
        gpu = enc.to(device)
        g32 = gpu(ids_t.to(device), mask_t.to(device)).float().cpu().numpy()
        with autocast_context("bf16", device.type):
            gbf = gpu(ids_t.to(device), mask_t.to(device)).float().cpu().numpy()
    return {
        "texts": len(texts),
        "cpu_fp32_vs_fp64": rel_err(cpu32, ref),
        "device_fp32_vs_fp64": rel_err(g32, ref),
        "device_bf16_autocast_vs_fp64": rel_err(gbf, ref),
        "finite": bool(np.isfinite(g32).all() and np.isfinite(gbf).all()),
    }


def check_step(data, cfg, device, precision: str) -> dict[str, Any]:
    """One joint training step of the real TrainModule on one batch: the loss and gradients on
    `device` under `precision` against the CPU in fp32, from identical weights."""
    import torch
    import torch.nn.functional as F

    from pipeline.train.device import autocast_context
    from pipeline.train.loop import build_train_module, set_stage_trainable, to_split

    task = data.tasks[0]
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    ref = build_train_module(data, cfg)
    dev = build_train_module(data, cfg)
    dev.load_state_dict(ref.state_dict())
    dev.to(device)
    results = {}
    for name, module, dv, prec in (("cpu", ref, cpu, "fp32"), ("device", dev, device, precision)):
        set_stage_trainable(module, "joint")
        split = to_split(data.train[task], dv)
        idx = np.arange(min(32, len(split)))
        inputs, labels = split.batch(idx)
        module.eval()  # no dropout: the two must compute the same function
        with autocast_context(prec, dv.type):
            logits, _ = module(inputs, task)
        loss = F.cross_entropy(logits.float(), labels)
        module.zero_grad()
        loss.backward()
        grads = {
            n: p.grad.detach().float().cpu().numpy()
            for n, p in module.named_parameters()
            if p.grad is not None
        }
        results[name] = (loss.item(), grads)
    (l_ref, g_ref), (l_dev, g_dev) = results["cpu"], results["device"]
    flat_ref = np.concatenate([g_ref[n].ravel() for n in sorted(g_ref)])
    flat_dev = np.concatenate([g_dev[n].ravel() for n in sorted(g_ref)])
    return {
        "task": task,
        "precision": precision,
        "loss_cpu_fp32": l_ref,
        "loss_device": l_dev,
        "grad_tensors": len(g_ref),
        "grad_rel_err": rel_err(flat_dev, flat_ref),
        "same_grad_set": sorted(g_ref) == sorted(g_dev),
    }


# ---------------------------------------------------------------------------- 3. throughput
def matmul_tflops(device, dtype, n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_throughput(
    encoder_dir: str, texts: list[str], device, max_length: int, pooling: str = "mean"
) -> dict:
    import contextlib

    import torch
    from tokenizers import Tokenizer

    from bench.serve import FlopCounter
    from pipeline.features import encode_texts, load_tokenizer
    from pipeline.model import load_encoder
    from pipeline.train.device import autocast_context

    pipeline_log = logging.getLogger("pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.WARNING)  # no per-bucket progress lines
    tok = load_tokenizer(encoder_dir)
    counter = FlopCounter(Path(encoder_dir), Tokenizer.from_file(f"{encoder_dir}/tokenizer.json"))
    gflop = counter.mean_gflop(texts) * len(texts)
    enc = load_encoder(encoder_dir, pooling, "all").eval().to(device)
    out: dict[str, Any] = {"texts": len(texts), "gflop_total": round(gflop, 1)}
    if device.type == "cuda":
        out["matmul_tflops_bf16"] = round(matmul_tflops(device, torch.bfloat16), 1)
        out["matmul_tflops_fp32"] = round(matmul_tflops(device, torch.float32), 1)
    modes = {"fp32": contextlib.nullcontext}
    if device.type == "cuda":
        modes["bf16"] = lambda: autocast_context("bf16", device.type)
    ref = None
    for name, ctx in modes.items():
        for batch in (128, 512):
            with ctx():
                encode_texts(enc, tok, texts[:2048], max_length, batch, device=str(device))
                sync(device)
                start = time.perf_counter()
                feats = encode_texts(enc, tok, texts, max_length, batch, device=str(device))
                sync(device)
                seconds = time.perf_counter() - start
            ref = feats if ref is None else ref
            out[f"{name}_batch{batch}"] = {
                "texts_per_s": round(len(texts) / seconds, 1),
                "tflops": round(gflop / seconds / 1e3, 2),
                "rel_err_vs_fp32_b128": rel_err(feats, ref),
            }
    pipeline_log.setLevel(level)
    return out


# ------------------------------------------------------------------------------ 4. training
def prepare(config_path: str, encoder_dir: str, data_root: str, sets: dict[str, Any], work: Path):
    """The driver's own preparation: config, tasks, inputs, weights, stats, loop config."""
    from pipeline.config import load_config
    from pipeline.data import load_tasks
    from pipeline.train.driver import (
        check_overlap,
        feature_stats,
        loop_config,
        prepare_inputs,
        task_weights,
    )
    from pipeline.train.spec import WorkerData

    overrides = {
        "encoder.path": str(Path(encoder_dir).resolve()),
        "storage_path": str(work / "runs"),
        "cache_dir": str(work / "cache"),
        **sets,
    }
    config = load_config(config_path, data_dir=data_root, overrides=overrides)
    tasks = load_tasks(config)
    full = {(t.name, n): s for t in tasks for n, s in t.splits.items()}
    check_overlap(config, tasks)
    inputs = prepare_inputs(config, tasks, str(config.encoder.path), full)
    mean, std = feature_stats(config, inputs)
    data = WorkerData(
        tasks=[t.name for t in tasks],
        num_classes={t.name: t.num_classes for t in tasks},
        weights=task_weights(config, tasks, inputs.train_features),
        feature_mean=mean,
        feature_std=std,
        train=inputs.train,
        dev=inputs.dev,
    )
    return config, data, loop_config(config, inputs.dim, inputs.encoder)


def run_training(data, cfg, device, work: Path) -> dict[str, Any]:
    """run_stages on `device` (rank 0 of 1), as train_loop_per_worker runs it under Ray."""
    import torch

    from pipeline.train.checkpoint import load_checkpoint
    from pipeline.train.device import select_precision
    from pipeline.train.loop import build_context, build_train_module, evaluate, run_stages

    torch.manual_seed(cfg.train.seed)
    module = build_train_module(data, cfg).to(device)
    precision = select_precision(
        cfg.train.precision, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    reports: list[dict[str, Any]] = []
    final_ckpt = work / "checkpoint"

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        reports.append(metrics)
        if checkpoint_dir is not None:  # keep the newest, as Ray's storage would
            shutil.rmtree(final_ckpt, ignore_errors=True)
            shutil.copytree(checkpoint_dir, final_ckpt)

    ctx = build_context(data, cfg, device, precision, report)
    sync(device)
    start = time.perf_counter()
    run_stages(module, ctx, None)
    sync(device)
    seconds = time.perf_counter() - start
    final = reports[-1]
    state = json.loads((final_ckpt / "state.json").read_text())
    out: dict[str, Any] = {
        "precision": precision,
        "seconds": round(seconds, 1),
        "epochs": [
            (h["stage"], h["epoch"], h["dev_macro_accuracy"], h["seconds"])
            for h in state["history"]
        ],
        "dev_macro_accuracy": final["dev_macro_accuracy"],
        "dev_accuracy": {t: final[f"dev_accuracy_{t}"] for t in data.tasks},
        "routes": {t: r["path"] for t, r in state.get("routing", {}).items()},
    }
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    # The selected model on the CPU, fp32: what export and serving would run.
    model_sd, _, _, _ = load_checkpoint(final_ckpt)
    cpu = torch.device("cpu")
    cpu_module = build_train_module(data, cfg)
    cpu_module.load_state_dict(model_sd)
    for task, route in out["routes"].items():
        cpu_module.heads.routes[task] = route
    cpu_ctx = build_context(data, cfg, cpu, "fp32", lambda m, c: None, splits=("dev",))
    cpu_dev = evaluate(cpu_module, cpu_ctx)
    out["cpu_fp32_dev_accuracy"] = {t: cpu_dev[t]["accuracy"] for t in data.tasks}
    out["cpu_minus_device_max_abs"] = round(
        max(abs(cpu_dev[t]["accuracy"] - out["dev_accuracy"][t]) for t in data.tasks), 3
    )
    return out


def dev_texts(data_root: Path, tasks: list[str], per_task: int) -> list[str]:
    texts = []
    for t in tasks:
        with open(data_root / t / "dev.jsonl") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(per_task), f, strict=False)]
    return texts


def all_texts(data_root: Path, tasks: list[str], split: str) -> list[str]:
    texts = []
    for t in tasks:
        with open(data_root / t / f"{split}.jsonl") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="local Hugging Face encoder directory")
    p.add_argument("--data-root", required=True, help="senteval directory (task/{train,dev}.jsonl)")
    p.add_argument("--config", default="configs/senteval6-finetune.yaml")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-path-out"))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip checks past this")
    p.add_argument("--max-texts", type=int, default=0, help="cap the throughput texts (0: all)")
    p.add_argument("--skip", action="append", default=[], help="parity|throughput|training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    import torch

    t0 = time.monotonic()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print("no CUDA device: every check runs on the CPU (a test of this script only)")
    rep = Report(Path(args.out))
    rep.put("selection", check_selection(device))
    root = Path(args.data_root)
    work = Path(tempfile.mkdtemp(prefix="gpu-path-"))
    config, data, cfg = prepare(args.config, args.encoder, str(root), parse_set(args.set), work)
    tasks = list(data.tasks)
    max_length, pooling = config.encoder.max_length, config.encoder.pooling

    def left() -> float:
        return args.budget_s - (time.monotonic() - t0)

    if "parity" not in args.skip:
        texts = dev_texts(root, tasks, 64)
        rep.put("parity", check_parity(args.encoder, texts, device, max_length, pooling))
        if cfg.encoder is not None:
            precision = rep.data["selection"]["precision_auto"]
            rep.put("train_step", check_step(data, cfg, device, precision))
    if "throughput" not in args.skip:
        texts = all_texts(root, tasks, "train")
        if args.max_texts:
            texts = texts[: args.max_texts]
        rep.put("throughput", check_throughput(args.encoder, texts, device, max_length, pooling))
    if "training" not in args.skip:
        if left() < 60:
            rep.put("training", f"skipped: {left():.0f} s of the budget left")
        else:
            out = run_training(data, cfg, device, work)
            out["config"] = args.config
            out["overrides"] = args.set
            rep.put("training", out)
    rep.put("seconds_total", round(time.monotonic() - t0, 1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
