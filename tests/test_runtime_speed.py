"""No compute on padding, no wait under light load: the runtime's length buckets (optimal
split, fewer padded tokens) and the service's greedy batcher (a lone request goes at once,
requests arriving during a call are merged into the next, never split), without timing."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest


# --------------------------------------------------------------------------- length buckets
def _cost(lengths, buckets, overhead):
    return sum(overhead + (end - start) * lengths[end - 1] for start, end in buckets)


@pytest.mark.parametrize("seed", range(5))
def test_buckets_cover_every_text_in_order_at_least_cost(seed):
    from serving.runtime import plan_buckets

    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(2, 60, size=9))
    buckets = plan_buckets(lengths, max_size=4, overhead=8)
    assert buckets[0][0] == 0 and buckets[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(buckets))
    assert all(0 < end - start <= 4 for start, end in buckets)
    # Brute force over every split of the 9 texts (2^8 of them): none is cheaper.
    best = min(
        _cost(lengths, list(itertools.pairwise((0, *cuts, len(lengths)))), 8)
        for r in range(len(lengths))
        for cuts in itertools.combinations(range(1, len(lengths)), r)
        if all(b - a <= 4 for a, b in itertools.pairwise((0, *cuts, len(lengths))))
    )
    assert _cost(lengths, buckets, 8) == best


def test_buckets_pad_far_less_than_one_batch():
    from serving.runtime import plan_buckets

    # Dev-like lengths: mostly short, a long tail (3 to 100 tokens).
    rng = np.random.default_rng(0)
    lengths = np.sort(np.clip(rng.gamma(2.0, 10.0, size=64).astype(int) + 3, 3, 100))
    buckets = plan_buckets(lengths)
    padded = sum((e - s) * lengths[e - 1] - lengths[s:e].sum() for s, e in buckets)
    one_batch = len(lengths) * lengths[-1] - lengths.sum()
    assert 1 < len(buckets) < 16
    assert padded < 0.15 * lengths.sum() < one_batch
    # Equal lengths: one bucket, no padding; no texts: no bucket.
    assert plan_buckets(np.full(10, 7)) == [(0, 10)]
    assert plan_buckets(np.array([], dtype=int)) == []


# --------------------------------------------------------------------------- batcher
class _Encoder:
    """Answers each text with its own value; holds each call until released."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, texts: list[str]) -> list[dict]:
        self.calls.append(list(texts))
        await self.release.wait()
        if self.fail:
            raise RuntimeError("model failed")
        return [{"text": t} for t in texts]


def _run(coro):
    return asyncio.run(coro)


async def _settle():
    """Let every ready task of the loop run (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_request_is_sent_at_once():
    from serving.service import Batcher

    async def main():
        enc = _Encoder()
        batcher = Batcher(enc, max_texts=8, max_wait_s=60, max_calls=1)
        task = asyncio.create_task(batcher.submit(["a"]))
        await _settle()
        assert enc.calls == [["a"]]  # sent before anything else happened: no batching wait
        enc.release.set()
        assert await task == [{"text": "a"}]

    _run(main())


def test_requests_during_a_call_are_merged_into_the_next_never_split():
    from serving.service import Batcher

    async def main():
        enc = _Encoder()
        batcher = Batcher(enc, max_texts=5, max_wait_s=60, max_calls=1)
        first = asyncio.create_task(batcher.submit(["a"]))
        await _settle()
        rest = [
            asyncio.create_task(batcher.submit(texts))
            for texts in (["b", "c"], ["d"], ["e", "f", "g"], ["h"])
        ]
        await _settle()
        assert enc.calls == [["a"]]  # the others wait for the call in flight
        enc.release.set()
        answers = [await first] + [await t for t in rest]
        # b..d merged (3 texts); e-g would make 6 > 5, so it starts the next call with h.
        assert enc.calls == [["a"], ["b", "c", "d"], ["e", "f", "g", "h"]]
        assert [[r["text"] for r in a] for a in answers] == [
            ["a"],
            ["b", "c"],
            ["d"],
            ["e", "f", "g"],
            ["h"],
        ]

    _run(main())


def test_two_calls_in_flight_and_a_failure_reaches_every_request_of_its_call():
    from serving.service import Batcher

    async def main():
        enc = _Encoder()
        enc.fail = True
        batcher = Batcher(enc, max_texts=8, max_wait_s=60, max_calls=2)
        tasks = [asyncio.create_task(batcher.submit([t])) for t in "abc"]
        await _settle()
        assert enc.calls == [["a"], ["b"]]  # two at once; c waits
        enc.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert enc.calls == [["a"], ["b"], ["c"]]

    _run(main())


def test_a_request_queued_too_long_is_refused_with_503():
    from bentoml.exceptions import ServiceUnavailable

    from serving.service import Batcher

    async def main():
        enc = _Encoder()
        batcher = Batcher(enc, max_texts=8, max_wait_s=0.01, max_calls=1)
        first = asyncio.create_task(batcher.submit(["a"]))
        await _settle()
        late = asyncio.create_task(batcher.submit(["b"]))
        await asyncio.sleep(0.05)
        enc.release.set()
        assert await first == [{"text": "a"}]
        with pytest.raises(ServiceUnavailable):
            await late
        assert enc.calls == [["a"]]

    _run(main())
