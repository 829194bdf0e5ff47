"""Data parallelism across the cores (issue 11): a call with enough work runs its length
buckets on several single-threaded session calls at once, a lone short text stays on the
multi-threaded session, CUDA and POLYTASK_ORT_PARALLEL=0 keep the sequential path, and every
path gives the same answers. Training caches: buckets computed concurrently come back in input
order, equal to the sequential ones. On the tiny random BERT of conftest; no timing."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from conftest import tiny_texts

from serving.runtime import (
    CPU,
    CUDA,
    PARALLEL_ENV,
    BucketScheduler,
    makespan,
    ort_parallel,
    pad_batch,
    parallel_workers,
    plan_buckets,
    plan_parallel,
)

MAX_LENGTH = 16  # tiny_config_dict's encoder.max_length


# --------------------------------------------------------------------------- selection
def test_parallel_workers_cpu_only_and_switchable():
    assert parallel_workers([CPU], 2, enabled=True) == 2
    assert parallel_workers([CPU], 4, enabled=True) == 4
    assert parallel_workers([CPU], 1, enabled=True) == 1  # one core: nothing to share
    assert parallel_workers([CPU], 2, enabled=False) == 1
    assert parallel_workers([CUDA, CPU], 2, enabled=True) == 1  # the GPU splits each GEMM


def test_parallel_env_var():
    assert ort_parallel({}) is True
    assert ort_parallel({PARALLEL_ENV: "0"}) is False
    assert ort_parallel({PARALLEL_ENV: " 1 "}) is True
    with pytest.raises(ValueError, match=PARALLEL_ENV):
        ort_parallel({PARALLEL_ENV: "yes"})


def test_makespan_hands_the_next_largest_to_the_first_free_worker():
    assert makespan([5, 4, 3, 3], 2) == 8  # 5+3 | 4+3
    assert makespan([10, 1, 1], 2) == 10
    assert makespan([7], 3) == 7


@pytest.mark.parametrize("seed", range(6))
def test_parallel_units_cover_every_text_once_and_never_finish_later(seed):
    rng = np.random.default_rng(seed)
    lengths = np.sort(np.clip(rng.gamma(2.0, 10.0, size=int(rng.integers(2, 80))), 3, 100))
    lengths = lengths.astype(np.int64)
    buckets = plan_buckets(lengths)
    units = plan_parallel(lengths, buckets, workers=2, speedup=1.0)
    assert units is not None
    covered = sorted(i for start, end in units for i in range(start, end))
    assert covered == list(range(len(lengths)))

    def costs(us):
        return [16 + (end - start) * int(lengths[end - 1]) for start, end in us]

    assert makespan(costs(units), 2) <= makespan(costs(buckets), 2)
    assert costs(units) == sorted(costs(units), reverse=True)  # largest first


def test_one_bucket_is_split_in_two_and_uneven_calls_stay_sequential():
    lengths = np.full(32, 20)
    assert plan_buckets(lengths) == [(0, 32)]
    assert plan_parallel(lengths, [(0, 32)], workers=2) == [(0, 16), (16, 32)]
    assert plan_parallel(lengths, [(0, 32)], workers=1) is None
    two = np.array([20, 21])
    assert plan_parallel(two, plan_buckets(two), workers=2) == [(1, 2), (0, 1)]
    # One text cannot be split: the multi-threaded session computes it sooner.
    assert plan_parallel(np.array([12]), [(0, 1)], workers=2) is None
    # A long text beside a short one: one thread on the long text (16 + 128 positions) takes
    # longer than both on the multi-threaded session ((16 + 5 + 16 + 128) / speedup).
    uneven = np.array([5, 128])
    assert plan_buckets(uneven) == [(0, 1), (1, 2)]
    assert plan_parallel(uneven, [(0, 1), (1, 2)], workers=2, speedup=1.2) is None
    assert plan_parallel(uneven, [(0, 1), (1, 2)], workers=2, speedup=1.0) == [(1, 2), (0, 1)]


# --------------------------------------------------------------------------- runtime
@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact


def _texts() -> list[str]:
    return tiny_texts(48, seed=0)


class _Spy:
    """An onnxruntime session that records the batch size of each call from each thread."""

    def __init__(self, session) -> None:
        self.session = session
        self.calls: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def run(self, outputs, feeds):
        with self.lock:
            self.calls.append((len(feeds["input_ids"]), threading.current_thread().name))
        return self.session.run(outputs, feeds)


def test_parallel_path_equals_sequential_and_picks_the_session(artifact):
    from serving.runtime import Runtime

    runtime = Runtime(artifact, threads=2, parallel=True)
    assert runtime.workers == 2 and runtime.single_session is not None
    multi, single = _Spy(runtime.session), _Spy(runtime.single_session)
    runtime.session, runtime.single_session = multi, single
    texts = _texts()

    sequential = runtime.run(texts, parallel=False)
    assert len(multi.calls) == sequential.runs and not single.calls
    multi.calls.clear()
    parallel = runtime.run(texts)
    # Every unit on the single-threaded session, from the pool's threads, none on the other.
    assert not multi.calls and len(single.calls) == parallel.runs >= 2
    assert sum(size for size, _ in single.calls) == len(texts)
    assert all(name.startswith("polytask-ort") for _, name in single.calls)
    for task in sequential.logits:
        np.testing.assert_allclose(parallel.logits[task], sequential.logits[task], atol=1e-5)
        np.testing.assert_allclose(
            parallel.probabilities[task], sequential.probabilities[task], atol=1e-5
        )
    assert (parallel.truncated == sequential.truncated).all()
    assert parallel.tokens == sequential.tokens
    # Each text alone gives the same answer as in the merged call (input order kept).
    for i in (0, 17, 47):
        alone = runtime.run([texts[i]], parallel=False)
        for task in alone.logits:
            np.testing.assert_allclose(parallel.logits[task][i], alone.logits[task][0], atol=1e-5)

    # A lone short text: the multi-threaded session, in the calling thread.
    single.calls.clear()
    multi.calls.clear()
    runtime.run(["good film"])
    assert multi.calls == [(1, threading.current_thread().name)] and not single.calls


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_parallel_path_off_by_env_on_one_thread_and_on_cuda(artifact, monkeypatch):
    import onnxruntime as ort

    from serving.runtime import Runtime

    monkeypatch.setenv(PARALLEL_ENV, "0")
    off = Runtime(artifact, threads=2)
    assert off.workers == 1 and off.single_session is None
    monkeypatch.delenv(PARALLEL_ENV)
    assert Runtime(artifact, threads=2).workers == 2  # the default is on
    assert Runtime(artifact, threads=1).workers == 1
    # onnxruntime-gpu: the CUDA provider leads, so one session and the sequential path. (No
    # GPU here: onnxruntime warns and runs the session on CPU.)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    cuda = Runtime(artifact, threads=2, device="cuda")
    assert cuda.providers[0] == CUDA
    assert cuda.workers == 1 and cuda.single_session is None
    out = cuda.run(_texts())
    lengths = np.sort([len(e.ids) for e in cuda.tokenizer.encode_batch(_texts())])
    assert out.runs == len(plan_buckets(lengths))  # the buckets as planned, none split


def test_concurrent_calls_share_the_pool_and_keep_their_answers(artifact):
    """Runtime.run from several threads at once (what `predict` allows): each gets its own
    texts' answers."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.runtime import Runtime

    runtime = Runtime(artifact, threads=2, parallel=True)
    texts = _texts()
    want = runtime.run(texts, parallel=False).logits
    chunks = [texts[i::3] for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(runtime.run, chunks))
    for i, out in enumerate(outs):
        for task in want:
            np.testing.assert_allclose(out.logits[task], want[task][i::3], atol=1e-5)


def test_plan_buckets_bounds_padded_positions():
    lengths = np.array([10] * 40 + [30] * 10)
    buckets = plan_buckets(lengths, max_tokens=128)
    assert [b for b in buckets if (b[1] - b[0]) * lengths[b[1] - 1] > 128] == []
    assert buckets[0][0] == 0 and buckets[-1][1] == 50
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))
    # Without the bound, the same texts take fewer, larger buckets.
    assert len(plan_buckets(lengths)) < len(buckets)
    # A text longer than the bound still gets a bucket of its own.
    assert plan_buckets(np.array([5, 300]), max_tokens=128) == [(0, 1), (1, 2)]


def test_pad_batch_pads_to_the_longest_and_keeps_an_empty_text_a_row():
    ids, mask = pad_batch([[5, 6, 7], [], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    ids, mask = pad_batch([[]], pad_id=9)
    assert ids.tolist() == [[9]] and mask.tolist() == [[0]]


class _FakeModel:
    """A scheduler's run_bucket: 'logits' are each row's token-id sum and length, so every
    text's answer is known; records each bucket's rows (their first token), and can hold the
    first call until released."""

    def __init__(self, hold: bool = False) -> None:
        self.buckets: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.lock = threading.Lock()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        with self.lock:
            self.buckets.append([int(x) for x in ids[:, 0]])  # each row's first token
        self.started.set()
        self.release.wait(10)
        return [np.stack([(ids * mask).sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)]


def _answers(call) -> dict[int, tuple[float, float]]:
    got = {}
    for rows, (logits,) in call.results:
        for row, value in zip(rows, logits, strict=True):
            got[int(row)] = (float(value[0]), float(value[1]))
    return got


def _text(seed: int, n: int) -> list[int]:
    """Token ids of a text whose first token is 1000 x `seed`."""
    return [1000 * seed + k for k in range(n)]


def test_scheduler_pools_concurrent_calls_into_shared_buckets():
    """Calls submitted while the workers are busy are computed together: texts of different
    calls share buckets, and each call gets exactly its own texts' answers."""
    model = _FakeModel(hold=True)
    scheduler = BucketScheduler(model, workers=2, idle_exit_s=1.0)
    calls: dict[int, object] = {}

    def submit(k: int, sizes: list[int]) -> None:
        ids = [_text(100 * k + i, n) for i, n in enumerate(sizes)]
        calls[k] = (ids, scheduler.submit(np.array(sizes), ids))

    first = threading.Thread(target=submit, args=(0, [3, 3, 3, 3]))
    first.start()
    assert model.started.wait(10)  # both workers hold a part of call 0
    time.sleep(0.05)
    others = [threading.Thread(target=submit, args=(k, [4, 4, 4])) for k in (1, 2, 3)]
    for t in others:
        t.start()
    time.sleep(0.2)  # all queued behind the held buckets
    model.release.set()
    for t in [first, *others]:
        t.join(10)
    assert sorted(calls) == [0, 1, 2, 3]
    for k, (ids, call) in calls.items():
        assert call.remaining == 0 and call.error is None
        want = {row: (float(sum(t)), float(len(t))) for row, t in enumerate(ids)}
        assert _answers(call) == want, k
    # Calls 1-3 (nine texts of 4 tokens) were pooled: some bucket holds texts of two calls.
    owners = [{first // 100_000 for first in bucket} for bucket in model.buckets]
    assert any(len(o) > 1 for o in owners), model.buckets
    # Call 0 ran first (it was the oldest), split between the two free workers.
    assert owners[0] == {0} and owners[1] == {0}
    assert scheduler.idle


def test_scheduler_hands_errors_to_the_calls_and_keeps_working():
    def broken(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        if (ids == 666).any():
            raise RuntimeError("bad bucket")
        return [np.zeros((len(ids), 2), dtype=np.float32)]

    scheduler = BucketScheduler(broken, workers=2, idle_exit_s=1.0)
    with pytest.raises(RuntimeError, match="bad bucket"):
        scheduler.submit(np.array([1]), [[666]])
    call = scheduler.submit(np.array([2, 3]), [[1, 2], [1, 2, 3]])
    assert call.remaining == 0 and sum(len(rows) for rows, _ in call.results) == 2
    assert scheduler.idle


def test_scheduler_plans_a_call_once_not_once_per_bucket(monkeypatch):
    """A large call is planned when it arrives; its buckets are then taken from that plan
    (planning 5,000 texts again for each of ~200 buckets took a third of the call's time)."""
    import serving.runtime as runtime_module

    calls = []
    real = runtime_module.plan_buckets

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "plan_buckets", counting)
    model = _FakeModel()
    scheduler = BucketScheduler(model, workers=2, idle_exit_s=1.0)
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 40, size=600)]
    ids = [[i % 97 + k for k in range(n)] for i, n in enumerate(sizes)]  # exact in float32
    call = scheduler.submit(np.array(sizes), ids)
    assert calls == [600]
    assert len(model.buckets) >= 10
    want = {row: (float(sum(t)), float(len(t))) for row, t in enumerate(ids)}
    assert _answers(call) == want
    # Every bucket respected the bounds of the plan.
    assert all(len(b) <= scheduler.max_size for b in model.buckets)


def test_scheduler_threads_exit_when_idle():
    scheduler = BucketScheduler(_FakeModel(), workers=2, idle_exit_s=0.1)
    scheduler.submit(np.array([2, 2, 2]), [[1, 2], [3, 4], [5, 6]])
    assert any(t.name.startswith("polytask-ort") for t in threading.enumerate())
    deadline = time.monotonic() + 5
    while scheduler._threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler._threads == 0
    # ...and start again on the next call.
    call = scheduler.submit(np.array([1]), [[7]])
    assert _answers(call) == {0: (7.0, 1.0)}


def test_a_lone_text_queues_behind_running_work_instead_of_oversubscribing(artifact):
    """While the scheduler computes, a one-text call joins it rather than running on the
    multi-threaded session beside it."""
    from serving.runtime import Runtime

    runtime = Runtime(artifact, threads=2, parallel=True)
    multi, single = _Spy(runtime.session), _Spy(runtime.single_session)
    runtime.session, runtime.single_session = multi, single
    hold = threading.Event()
    inner = runtime._run_single

    def slow(ids, mask):
        hold.wait(10)
        return inner(ids, mask)

    runtime.scheduler._run_bucket = slow
    busy = threading.Thread(target=runtime.run, args=(_texts(),))
    busy.start()
    deadline = time.monotonic() + 5
    while runtime.scheduler.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    lone = threading.Thread(target=runtime.run, args=(["good film"],))
    lone.start()
    time.sleep(0.1)
    hold.set()
    busy.join(10)
    lone.join(10)
    assert not multi.calls
    assert sum(size for size, _ in single.calls) == len(_texts()) + 1


# --------------------------------------------------------------------------- training caches
def test_parallel_map_keeps_order_and_bounds_what_it_takes_ahead():
    from pipeline.features import parallel_map

    taken: list[int] = []
    done: list[int] = []
    ahead: list[int] = []

    def items():
        for i in range(20):
            taken.append(i)
            ahead.append(len(taken) - len(done))
            yield i

    def slow(i: int) -> int:
        time.sleep(0.002 * (i % 3))  # later items often finish first
        return i * i

    for item, value in parallel_map(slow, items(), workers=3):
        assert value == item * item
        done.append(item)
    assert done == list(range(20))
    assert max(ahead) <= 2 * 3 + 1  # never the whole input in memory
    assert list(parallel_map(slow, iter(range(4)), workers=1)) == [(i, i * i) for i in range(4)]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    from pipeline.model import load_encoder

    return load_encoder(str(tiny_encoder_dir)).eval()


def test_features_in_parallel_equal_sequential_in_input_order(
    tiny_encoder_dir, encoder, tmp_path, monkeypatch, caplog
):
    from pipeline.features import FeatureCache, OrtFeatureEncoder, encode_texts, load_tokenizer

    texts = _texts()
    monkeypatch.setenv("POLYTASK_ORT_THREADS", "2")
    parallel = FeatureCache(tmp_path / "p", str(tiny_encoder_dir), MAX_LENGTH, "mean")
    with caplog.at_level(logging.INFO, logger="pipeline.features"):
        feats = parallel.get(texts, desc="parallel", batch_size=4)
    runner = parallel._runner()
    assert isinstance(runner, OrtFeatureEncoder) and runner.workers == 2
    assert parallel._workers == 2
    # progress kept, counting the texts computed (the list repeats one)
    distinct = len(set(texts))
    assert distinct < len(texts)
    assert (
        f"parallel ({distinct} distinct of {len(texts)} texts): {distinct}/{distinct} texts (100%)"
        in caplog.text
    )

    monkeypatch.setenv(PARALLEL_ENV, "0")
    sequential = FeatureCache(tmp_path / "s", str(tiny_encoder_dir), MAX_LENGTH, "mean")
    want = sequential.get(texts, batch_size=4)
    assert sequential._runner().workers == 1 and sequential._workers == 1
    np.testing.assert_allclose(feats, want, atol=1e-6)
    # Input order: each row is its own text's features (PyTorch, one text at a time).
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    for i in (0, 13, 47):
        alone = encode_texts(encoder, tokenizer, [texts[i]], MAX_LENGTH)
        np.testing.assert_allclose(feats[i], alone[0], atol=1e-4)


def test_token_states_in_parallel_equal_sequential(tiny_encoder_dir, encoder, tmp_path):
    from pipeline.token_cache import OrtStateProducer, TokenStateCache

    texts = _texts()
    path = tmp_path / "lower.onnx"
    entries = {}
    for parallel in (True, False):
        producer = OrtStateProducer(encoder, 1, path, MAX_LENGTH, threads=2, parallel=parallel)
        assert producer.workers == (2 if parallel else 1)
        cache = TokenStateCache(
            tmp_path / str(parallel), str(tiny_encoder_dir), 1, MAX_LENGTH, 4, producer
        )
        entries[parallel] = cache.get(texts)
    a, b = entries[True], entries[False]
    assert (a.lengths == b.lengths).all() and (a.offsets == b.offsets).all()
    np.testing.assert_allclose(a.states.astype(np.float32), b.states.astype(np.float32), atol=1e-3)
