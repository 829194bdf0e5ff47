"""Two artifacts' serving throughput, interleaved: which is faster, measured so that the
machine's drift cannot decide it.

`bench/serve.py` measures one model per run, and on this shared 2-core machine two runs minutes
apart differed by up to 10% for the same model (docs/results.md, "Run 15"). Here both artifacts
are loaded in one process. `serving.runtime.Runtime.run` (what `/predict` calls) is driven by 4
concurrent callers with 32 dev texts per call, as they come, for `--seconds` per round. The
artifacts alternate round by round, and the order flips every round, so a slow minute of the
machine slows both alike. Each artifact is loaded twice (A, B, B, A) and the rounds use both
copies, because load order alone moved a runtime's speed by a few percent.

    python bench/ab_runtime.py A_ARTIFACT B_ARTIFACT [--rounds 8] [--seconds 8] [--data-dir DIR]

Prints each round's texts/s, each artifact's median, and the ratio of the medians A / B.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "senteval"


def closed_loop(items: list, do, clients: int, seconds: float) -> float:
    """Per second, the sum of `do(item)` (what each call counts: texts) over `clients` threads
    taking the next of `items` round-robin, back to back, for `seconds`."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            with lock:
                item = items[state["next"] % len(items)]
                state["next"] += 1
            counted = do(item)
            with lock:
                state["done"] += counted

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state["done"] / (time.monotonic() - start)


def throughput(runtime, calls: list[list[str]], seconds: float, clients: int = 4) -> float:
    """Texts/s of `clients` threads calling `runtime.run` back to back for `seconds`."""

    def call(texts: list[str]) -> int:
        runtime.run(texts)
        return len(texts)

    return closed_loop(calls, call, clients, seconds)


def main(argv: list[str] | None = None) -> int:
    from bench.serve import dev_texts
    from serving.runtime import Runtime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="artifact directory A")
    p.add_argument("b", type=Path, help="artifact directory B")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=8.0, help="per artifact per round")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = p.parse_args(argv)
    texts = dev_texts(args.data_dir)
    calls = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    # Each artifact twice, loaded A, B, B, A: the runtime loaded first ran a few percent slower
    # than the same artifact loaded later (session 11: five MLPs / one MLP measured 0.86-0.90
    # with A loaded first, 0.96 with the order swapped), so each artifact gets an early and a
    # late copy, and each round uses one pair.
    copies = {"A": [Runtime(args.a)], "B": [Runtime(args.b)]}
    copies["B"].append(Runtime(args.b))
    copies["A"].append(Runtime(args.a))
    for pair in copies.values():
        for r in pair:
            throughput(r, calls, 2.0)  # warm-up: threads, allocations
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.rounds):
        order = ["A", "B"] if i % 2 == 0 else ["B", "A"]
        for name in order:
            rates[name].append(throughput(copies[name][(i // 2) % 2], calls, args.seconds))
        print(f"round {i + 1}: A {rates['A'][-1]:.1f}, B {rates['B'][-1]:.1f} texts/s", flush=True)
    a, b = (float(np.median(rates[k])) for k in ("A", "B"))
    print(f"A {args.a}: median {a:.1f} texts/s")
    print(f"B {args.b}: median {b:.1f} texts/s")
    wins = sum(x > y for x, y in zip(rates["A"], rates["B"], strict=True))
    print(f"A / B: {a / b:.3f} (A faster in {wins} of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
