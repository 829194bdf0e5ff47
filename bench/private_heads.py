"""What the private paths cost at serving, alone: four private heads (senteval6 has four
private tasks) exported to ONNX and run by onnxruntime on one thread, per call, for a few batch
sizes. Layouts, all with random weights (the cost does not depend on their values):

- `five_stacked`: five members of 512 -> 256 through `member_logits` (the broadcast form
  [B, d] @ [K, d, h] of the graphs exported before session 11);
- `five_wide`: the same ensemble through `PrivateEnsemble.forward` (first layer one
  [d, K*h1] matmul, last layer and mean one [K*h, C] matmul): what is exported now;
- `small_wide`: five members of 256 -> 128, wide;
- `one`: one MLP of 512 -> 256 (`routing.private.members: 1`).

    python bench/private_heads.py [--batches 1,8,20,64] [--rounds 7]

Prints the median milliseconds per call of each layout at each batch size (rounds
interleaved, so a slow moment of the machine touches every layout alike).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from pipeline.model import private_head
    from serving.runtime import session_options

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,20,64")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=40, help="calls per round")
    args = p.parse_args(argv)

    class Heads(torch.nn.Module):
        def __init__(self, heads: list[torch.nn.Module], stacked: bool = False) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleList(heads)
            self.stacked = stacked

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if self.stacked:
                return tuple(h.member_logits(x).mean(0) for h in self.heads)
            return tuple(h(x) for h in self.heads)

    torch.manual_seed(0)
    layouts = {
        "five_stacked": ([512, 256], 5, True),
        "five_wide": ([512, 256], 5, False),
        "small_wide": ([256, 128], 5, False),
        "one": ([512, 256], 1, False),
    }
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (hidden, members, stacked) in layouts.items():
            heads = [private_head(384, 2, hidden, 0.3, members).eval() for _ in range(4)]
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(
                Heads(heads, stacked).eval(),
                (torch.randn(7, 384),),
                str(path),
                input_names=["x"],
                dynamic_axes={"x": {0: "batch"}},
                dynamo=False,
            )
            sessions[name] = ort.InferenceSession(
                str(path), session_options(threads=1), providers=["CPUExecutionProvider"]
            )
    print("ms per call, 4 private heads, one onnxruntime thread (median of rounds)")
    print("batch  " + "  ".join(f"{n:>12}" for n in sessions))
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batches.split(",")):
        x = rng.standard_normal((batch, 384), dtype=np.float32)
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for s in sessions.values():
            s.run(None, {"x": x})  # warm-up
        for _ in range(args.rounds):
            for name, s in sessions.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    s.run(None, {"x": x})
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
        print(f"{batch:5d}  " + "  ".join(f"{np.median(v):12.2f}" for v in times.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
