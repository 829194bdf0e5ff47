"""Where an artifact's serving time goes: the encoder, the task heads, or the Python around
`session.run`; and what running the heads once per call (`serving.graph.split_heads`) buys.

Issue 11 found five-member private paths costing about 9% of `Runtime.run`'s throughput while
the heads alone (`bench/private_heads.py`, a tight loop) take about 3.5% of a call. Here each
artifact's `model.onnx` is cut where the task heads begin (the runtime's own cut), and these
are timed on the same dev texts, all on the data-parallel path the service takes under load
(`--workers` threads, each calling a single-threaded session):

- `full`: the whole graph, one `session.run` per length bucket (buckets planned by
  `serving.runtime.plan_buckets` over 4 pooled calls of 32 texts, as the scheduler would);
- `encoder`: the encoder part only, on the same buckets;
- `rt whole` and `rt split`: `Runtime.run` itself, 4 callers x 32 texts (`bench/ab_runtime.py`'s
  load), running the whole graph per bucket (POLYTASK_ORT_SPLIT=0) and the heads once per call
  (the default).

`full - encoder` is what the heads cost where they run, after the encoder has been through the
caches (`heads in situ`), beside the heads part timed alone in a tight loop on the same buckets'
features (`heads alone`). All ways of all artifacts alternate round by round, the order flipped
each round, so drift touches them alike.

    python bench/heads_in_situ.py ARTIFACT [ARTIFACT ...] [--rounds 5] [--seconds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "senteval"


def parallel_rate(run_bucket, buckets: list, workers: int, seconds: float) -> float:
    """Texts/s of `workers` threads taking the next bucket round-robin for `seconds`."""
    from bench.ab_runtime import closed_loop

    def run(feeds: dict[str, np.ndarray]) -> int:
        run_bucket(feeds)
        return len(next(iter(feeds.values())))

    return closed_loop(buckets, run, workers, seconds)


def runtime_rate(
    runtime, calls: list[list[str]], seconds: float, clients: int = 4
) -> tuple[float, dict[str, float]]:
    """Texts/s of `clients` threads calling `runtime.run` back to back (ab_runtime's load),
    and how the scheduler's workers spent it: the share of the workers' time inside
    `session.run` (`busy`), texts per `session.run` (`bucket`) and the padded share of the
    positions computed (`padding`)."""
    from bench.ab_runtime import closed_loop

    lock = threading.Lock()
    state = {"texts": 0, "tokens": 0, "padded": 0, "runs": 0, "in_run": 0.0}
    inner = runtime._run_single

    def timed(ids, mask):
        t0 = time.perf_counter()
        try:
            return inner(ids, mask)
        finally:
            with lock:
                state["in_run"] += time.perf_counter() - t0
                state["runs"] += 1
                state["padded"] += ids.size

    def call(texts: list[str]) -> int:
        out = runtime.run(texts)
        with lock:
            state["texts"] += len(texts)
            state["tokens"] += out.tokens
        return len(texts)

    runtime.scheduler._run_bucket = timed
    start = time.monotonic()
    try:
        rate = closed_loop(calls, call, clients, seconds)
    finally:
        runtime.scheduler._run_bucket = inner
    wall = time.monotonic() - start
    detail = {
        "busy": state["in_run"] / (runtime.workers * wall),
        "bucket": state["texts"] / max(state["runs"], 1),
        "padding": 1 - state["tokens"] / max(state["padded"], 1),
    }
    return rate, detail


def main(argv: list[str] | None = None) -> int:
    import json

    import onnxruntime as ort

    from serving.graph import split_heads
    from serving.runtime import (
        INPUT_NAMES,
        Runtime,
        ort_threads,
        pad_batch,
        plan_buckets,
        session_options,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--workers", type=int, default=0, help="default: ort_threads()")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = p.parse_args(argv)
    workers = args.workers or ort_threads()

    texts = [
        json.loads(line)["text"]
        for path in sorted(args.data_dir.glob("*/dev.jsonl"))
        for line in path.read_text().splitlines()
    ]
    if not texts:
        raise SystemExit(f"no */dev.jsonl texts under {args.data_dir}")
    np.random.default_rng(0).shuffle(texts)
    texts = (texts * (2048 // len(texts) + 1))[:2048]  # a small dev set is sent again
    calls = [texts[i : i + 32] for i in range(0, 2048, 32)]

    def session(model) -> object:
        return ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])

    ways: dict[tuple[int, str], object] = {}
    buckets_of: dict[int, list[dict[str, np.ndarray]]] = {}
    alone_of: dict[int, object] = {}
    for a, artifact in enumerate(args.artifacts):
        parts = split_heads(artifact / "model.onnx")
        if parts is None:
            raise SystemExit(f"{artifact}: its graph has no clean cut at the heads")
        whole_rt = Runtime(artifact, parallel=True, split=False)
        split_rt = Runtime(artifact, parallel=True, split=True)
        assert split_rt.heads_session is not None
        feeds = []  # buckets as the scheduler would plan 4 pooled calls of 32 texts
        for i in range(0, len(calls) - 3, 4):
            pooled = [t for c in calls[i : i + 4] for t in c]
            enc = split_rt.tokenizer.encode_batch(pooled)
            lengths = np.array([len(e.ids) for e in enc])
            order = np.argsort(lengths, kind="stable")
            for start, end in plan_buckets(lengths[order]):
                ids, mask = pad_batch([enc[j].ids for j in order[start:end]], split_rt.pad_id)
                feeds.append({INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})
        buckets_of[a] = feeds
        full, encoder, heads = (
            session(str(artifact / "model.onnx")),
            session(parts.encoder),
            session(parts.heads),
        )
        head_feeds = [
            dict(zip(parts.boundary, encoder.run(parts.boundary, f), strict=True)) for f in feeds
        ]
        ways[(a, "full")] = lambda f, s=full: s.run(None, f)
        ways[(a, "encoder")] = lambda f, s=encoder: s.run(None, f)
        ways[(a, "rt whole")] = whole_rt
        ways[(a, "rt split")] = split_rt

        def alone(s=heads, hf=head_feeds) -> float:
            start = time.perf_counter()
            for f in hf:
                s.run(None, f)
            return (time.perf_counter() - start) / len(hf)

        alone_of[a] = alone
        size = statistics.mean(len(f[INPUT_NAMES[0]]) for f in feeds)
        print(
            f"[{a}] {artifact}: heads read {parts.boundary} (heads part "
            f"{len(parts.heads) / 1e6:.1f} MB); {len(feeds)} buckets of {size:.1f} texts"
        )
        del parts

    rates: dict[tuple[int, str], list[float]] = {k: [] for k in ways}
    alone_ms: dict[int, list[float]] = {a: [] for a in alone_of}
    details: dict[tuple[int, str], list[dict[str, float]]] = {}
    keys = list(ways)
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            a, way = key
            if way.startswith("rt"):
                rate, detail = runtime_rate(ways[key], calls, args.seconds)
                details.setdefault(key, []).append(detail)
            else:
                rate = parallel_rate(ways[key], buckets_of[a], workers, args.seconds)
            rates[key].append(rate)
        for a, fn in alone_of.items():
            alone_ms[a].append(1000 * fn())
        line = "  ".join(f"{a}:{w} {rates[(a, w)][-1]:.0f}" for a, w in keys)
        print(f"round {r + 1}: {line}", flush=True)

    print(f"\nmedians over {args.rounds} rounds, texts/s ({workers} workers)")
    print(
        f"{'artifact':>8} {'full':>7} {'encoder':>8} {'full/enc':>9} {'rt whole':>9} "
        f"{'rt split':>9} {'split/whole':>12} {'heads in situ':>14} {'heads alone':>12}"
    )
    for a in range(len(args.artifacts)):
        med = {w: statistics.median(rates[(a, w)]) for _, w in keys if _ == a}
        size = statistics.mean(len(f[INPUT_NAMES[0]]) for f in buckets_of[a])
        # A worker's seconds per text, times texts per bucket: ms per bucket.
        in_situ = 1000 * workers * (1 / med["full"] - 1 / med["encoder"]) * size
        print(
            f"{a:>8} {med['full']:>7.1f} {med['encoder']:>8.1f} "
            f"{med['full'] / med['encoder']:>9.3f} {med['rt whole']:>9.1f} "
            f"{med['rt split']:>9.1f} {med['rt split'] / med['rt whole']:>12.3f} "
            f"{in_situ:>11.2f} ms {statistics.median(alone_ms[a]):>9.2f} ms"
        )
    print("\nRuntime.run's scheduler: workers' time in session.run, texts per run, padded share")
    for (a, way), ds in details.items():
        med = {k: statistics.median(d[k] for d in ds) for k in ds[0]}
        print(
            f"  [{a}] {way}: busy {med['busy']:.1%}, {med['bucket']:.1f} texts per run, "
            f"padding {med['padding']:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
