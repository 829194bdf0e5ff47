"""Which weight MatMuls can be int8? Per-node sensitivity, then mixed-precision variants.

For an exported artifact, side by side in one run:

    (1) every encoder weight MatMul quantized alone (dynamic int8, per-channel weights, as
        `polytask export --quantize int8` does): the mean KL divergence of every task's
        probabilities from fp32 on training texts (`calibration_sample`, 256 texts: never dev)
    (2) variants keeping the k most sensitive MatMuls in fp32 (k = 0, 2, 4, ...): per-task dev
        accuracy lost against fp32 (the export gate allows 0.5 points on every task) and
        texts/s over all dev texts through `serving.runtime`, next to fp32's

    python bench/int8_sensitivity.py [ARTIFACT_DIR] [--data-dir DIR] [--keep 0,2,4,6,8,12,16]

Default artifact: runs/latest/artifact. Speeds depend on the machine's load; compare within one
run. The choice of k seen here is a dev-set observation, not a rule the export applies.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def read_split(data_dir: Path, task: str, split: str) -> tuple[list[str], list]:
    rows = [json.loads(line) for line in (data_dir / task / f"{split}.jsonl").open()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main(argv: list[str] | None = None) -> int:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.export import (
        INT8_VARIANTS,
        _score,
        calibration_sample,
        int8_nodes,
        unshare_gemm_weights,
    )
    from serving.artifact import ArtifactMetadata
    from serving.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", type=Path, default=REPO / "runs/latest/artifact")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/senteval")
    parser.add_argument("--keep", default="0,2,4,6,8,12,16", help="k values (fp32 MatMuls)")
    args = parser.parse_args(argv)
    artifact = args.artifact.resolve()
    if not (artifact / "metadata.json").is_file():
        parser.error(f"{artifact}: not an exported artifact (no metadata.json)")
    meta = ArtifactMetadata.read(artifact)
    tasks = [t.name for t in meta.tasks]
    train = {t: read_split(args.data_dir, t, "train")[0] for t in tasks}
    calib = calibration_sample([train[t] for t in tasks], 256)
    dev: dict[str, tuple[list[str], np.ndarray]] = {}
    for info in meta.tasks:
        texts, labels = read_split(args.data_dir, info.name, "dev")
        index = {str(label): i for i, label in enumerate(info.labels)}
        dev[info.name] = (texts, np.array([index[str(label)] for label in labels]))

    fp32 = Runtime(artifact)
    reference = fp32.run(calib).probabilities

    def kl(runtime: Runtime) -> float:
        out = runtime.run(calib).probabilities
        per_task = [
            np.mean(np.sum(p * (np.log(p + 1e-9) - np.log(out[t] + 1e-9)), axis=1))
            for t, p in reference.items()
        ]
        return float(np.mean(per_task))

    def fresh_graph():
        proto = onnx.load(str(artifact / "model.onnx"))
        del proto.graph.value_info[:]  # as pipeline.export.quantize_int8 does
        unshare_gemm_weights(proto)
        return proto

    work = Path(tempfile.mkdtemp(prefix="int8-sensitivity-"))

    def build(name: str, nodes: list[str]) -> Runtime:
        out = work / name
        out.mkdir()
        quantize_dynamic(
            fresh_graph(),
            str(out / "model.onnx"),
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=nodes,
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        for f in artifact.iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copyfile(f, out / f.name)
        meta.model_copy(update={"precision": "int8"}).write(out)
        return Runtime(out)

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer logs a line per tensor
    try:
        graph = fresh_graph()
        nodes = int8_nodes(graph, INT8_VARIANTS[1])  # encoder MatMuls, heads fp32
        weight_of = {node.name: node.input[1] for node in graph.graph.node}
        start = time.monotonic()
        sensitivity = {n: kl(build(f"one-{i}", [n])) for i, n in enumerate(nodes)}
        ranked = sorted(nodes, key=lambda n: -sensitivity[n])
        print(
            f"(1) {len(nodes)} encoder weight MatMuls, each quantized alone, mean KL from fp32 "
            f"on {len(calib)} training texts ({time.monotonic() - start:.0f} s); most sensitive:"
        )
        for n in ranked[:8]:
            print(f"    {sensitivity[n]:.2e}  {n} ({weight_of[n]})")
        fp32_accuracy, fp32_speed = _score(fp32, dev)
        print(
            "(2) dev accuracy, fp32: "
            + ", ".join(f"{t} {a:.2f}" for t, a in fp32_accuracy.items())
            + f"; {fp32_speed:.0f} texts/s"
        )
        print(f"{'k fp32':>6} {'KL':>9}  points lost per task{'':<38} worst  texts/s  x fp32")
        for k in [int(x) for x in args.keep.split(",")]:
            keep = set(ranked[:k])
            runtime = build(f"keep-{k}", [n for n in nodes if n not in keep])
            accuracy, speed = _score(runtime, dev)
            drops = {t: fp32_accuracy[t] - accuracy[t] for t in tasks}
            fp32_speed = max(fp32_speed, _score(fp32, dev)[1])  # the faster fp32 of the run
            print(
                f"{k:>6} {kl(runtime):>9.2e}  "
                + " ".join(f"{t} {d:+.2f}" for t, d in drops.items())
                + f"  {max(drops.values()):+.2f}  {speed:>7.0f}  {speed / fp32_speed:.2f}x"
                + ("  passes" if max(drops.values()) <= 0.5 else "")
            )
    finally:
        logging.disable(previous)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
