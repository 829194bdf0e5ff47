"""How slow is memory that a process left idle? Measures, on this machine, the time to touch
the same bytes again after idling for a given number of seconds.

Why it exists: on the sandbox VMs polytask is developed on, the host takes back a guest
process's idle memory within about a second, without any page fault the guest can see, and
touching it again costs ~17 us per 4 KiB page. A server that sat idle for 12 s needs ~100-300 ms
more for its first request (its weights are ~42 MB), though its code did nothing different.
This separates that cost from the service's own: it touches a numpy buffer of the same size as
the artifact's `model.onnx` (one float per 4 KiB page, no compute) and, with `--artifact`, runs
one text through `serving.runtime.Runtime` after the same idle gaps.

    python bench/idle_memory.py [--artifact runs/latest/artifact] [--gaps 0.05,1,3,12]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def faults() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="also time one text through this artifact")
    parser.add_argument("--mib", type=float, default=42.0, help="buffer size without --artifact")
    parser.add_argument("--gaps", default="0.05,0.3,1,3,12", help="idle seconds, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]

    size = args.mib * 2**20
    runtime = None
    if args.artifact is not None:
        from serving.runtime import Runtime

        size = (args.artifact / "model.onnx").stat().st_size
        runtime = Runtime(args.artifact)
    buffer = np.ones(int(size) // 4, dtype=np.float32)
    stride = 4096 // 4  # one float per 4 KiB page

    def touch() -> float:
        start = time.perf_counter()
        float(buffer[::stride].sum())
        return 1000 * (time.perf_counter() - start)

    def one_text() -> float:
        start = time.perf_counter()
        runtime.run(["an idle server answers its first request"])
        return 1000 * (time.perf_counter() - start)

    probes = {"touch buffer": touch} | ({"one text, Runtime.run": one_text} if runtime else {})
    print(f"{size / 2**20:.1f} MiB buffer ({len(buffer[::stride])} pages of 4 KiB)")
    for name, probe in probes.items():
        for _ in range(20):  # warm: every page touched, every lazy allocation made
            probe()
        print(f"\n{name}: ms after each idle gap ({args.repeats} times; guest page faults)")
        for gap in gaps:
            times, guest = [], 0
            for _ in range(args.repeats):
                time.sleep(gap)
                before = faults()
                times.append(probe())
                guest += faults() - before
            print(f"  idle {gap:>6g} s: " + ", ".join(f"{t:7.1f}" for t in times) + f"  ({guest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
