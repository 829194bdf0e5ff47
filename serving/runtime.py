"""Inference on one artifact directory: tokenizers + onnxruntime + numpy, no torch.

    texts -> tokenizer.json (truncation built in) -> length buckets (texts sorted by token
    count, split where padding would cost more than another session.run) -> model.onnx (one
    encoder pass per bucket, every task's logits) -> logits / T_task (temperature scaling, from
    metadata.json) -> softmax per task [-> top-label map, for tasks whose calibration chose
    one] -> label, probability, truncated flag

Temperatures are applied here rather than folded into model.onnx: they are fitted after the
graph is exported and checked (on the final graph, int8 included), the same graph keeps its
PyTorch parity check, and the raw logits stay available (`BatchOutput.logits`) to measure
calibration before and after with the very code that serves.

On CPU a call with enough work runs its buckets **data-parallel**: one single-threaded
session.run per core at once, each on its own buckets, rather than one bucket at a time with
every GEMM split across the cores. On sequences of ~20 tokens the GEMMs are too small to split
well; whole buckets side by side kept both cores busier (docs/results.md, issue 11, run 6).
The buckets are cut by a `BucketScheduler` shared by all concurrent calls (continuous
batching): each core, when free, takes the next bucket from every call's texts pooled and
sorted by length, so texts of different requests fill one bucket, and no core waits for the
rest of a call to finish before starting on the next one (run 8). One text, or a call that one
long text dominates, still runs on the multi-threaded session when nothing else is running,
which answers it sooner. $POLYTASK_ORT_PARALLEL=0 turns the parallel path off; on CUDA it is
never used.

On the data-parallel path the graph also runs **in two parts** (`serving.graph.split_heads`):
the encoder part per bucket on the scheduler's threads, and the task heads once per call, on
all of its texts, in the caller's thread. A bucket holds ~9 texts at saturation and each run of
the whole graph reads every head's weights from memory again (~29 MB for five-member private
paths), so per-bucket heads cost more than their arithmetic (docs/results.md, issue 11, "Run
16"). $POLYTASK_ORT_SPLIT=0 runs the whole graph per bucket instead.

The runtime is the only place that runs the model; the BentoML service and `polytask predict`
both call it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from serving.artifact import (
    INPUT_NAMES,
    METADATA_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    ArtifactMetadata,
    Calibration,
    artifact_file,
)

logger = logging.getLogger(__name__)

THREADS_ENV = "POLYTASK_ORT_THREADS"
DEVICE_ENV = "POLYTASK_ORT_DEVICE"
SPINNING_ENV = "POLYTASK_ORT_SPINNING"
PARALLEL_ENV = "POLYTASK_ORT_PARALLEL"
SPLIT_ENV = "POLYTASK_ORT_SPLIT"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Most texts per session.run: bounds memory for large inputs.
CHUNK_SIZE = 64
# What one more session.run costs, in token positions of compute: a batch of texts sorted by
# length is split where padding the shorter texts to the longer ones would cost more than
# this. Measured on all-MiniLM-L6-v2 (CPU, 1 and 2 threads): a 1-text, 2-token call takes
# ~2.3 ms, about as long as 10-16 more tokens in a large batch.
RUN_OVERHEAD_TOKENS = 16
# Most token positions (texts x longest) in one single-threaded session.run of the
# data-parallel path. Measured on all-MiniLM-L6-v2, one thread (docs/results.md, issue 11,
# run 8): tokens per ms peak at 400-700 positions per call (6.7-6.9) and fall beyond (6.3 at
# 64 x 20, 5.9 at 64 x 32: the FFN activations outgrow the core's cache), while a call's own
# overhead is ~20 positions. The multi-threaded and CUDA sessions take buckets of up to
# CHUNK_SIZE texts regardless.
RUN_MAX_TOKENS = 512
# Most rows per run of the heads part when the graph is split (module docstring): a request
# is one run; a private ensemble's hidden layer at this size is ~2.6 MB.
HEADS_CHUNK = 256
# Texts are cut to max_length x this many characters before tokenization, so the tokenizer
# never sees a megabyte. A token spans at least one character, and English wordpieces ~4-5
# with their space, so the cut leaves every token the model reads in all but texts of mostly
# whitespace or symbols the vocabulary lacks; a cut text is always reported as truncated.
CHARS_PER_TOKEN = 32
# How much faster the multi-threaded session computes a bucket than one thread does: a call
# runs data-parallel only when its units, one thread each, finish before the buckets would
# on all threads (makespan x this < their total cost; `plan_parallel`). Measured on the 2-core
# machine: 1.1x for one short text (9.7 vs 10.7 ms), 1.7x for batches of 32 (564-579 vs
# 334-338 texts/s). Small calls count most here (large ones split evenly), so 1.2: the
# sequential path where one long text dominates a call, the parallel one for calls of two or
# more dev-like texts (1.38-1.48x faster there: docs/results.md, issue 11, run 6).
MULTI_THREAD_SPEEDUP = 1.2

Device = Literal["auto", "cpu", "cuda"]


class UnknownTaskError(ValueError):
    """A requested task is not in the model; the message lists the valid ones."""


@dataclass
class TaskPrediction:
    """One task's answer for one text.

    Attributes:
        label: The most probable label.
        probability: Its probability.
        probabilities: Every label's probability, when asked for.
    """

    label: str
    probability: float
    probabilities: dict[str, float] | None = None


@dataclass
class TextPrediction:
    """Every requested task's answer for one text; `truncated` when it exceeded max length."""

    tasks: dict[str, TaskPrediction]
    truncated: bool


@dataclass
class Prediction:
    """The answers for a list of texts, in input order, and the model version that gave them."""

    results: list[TextPrediction]
    model_version: str


@dataclass
class BatchOutput:
    """Raw model output for a batch: per task, probabilities [n, classes] (temperature applied)
    and the graph's logits [n, classes] (before it); truncated [n].

    `tokens` counts the texts' real tokens, `padded_tokens` the padding positions the model
    also computed (see `plan_buckets`); `runs` the session.run calls."""

    probabilities: dict[str, np.ndarray]
    truncated: np.ndarray
    model_version: str = field(default="")
    tokens: int = 0
    padded_tokens: int = 0
    runs: int = 0
    logits: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- ORT settings
def ort_threads(env: dict[str, str] | None = None) -> int:
    """intra-op threads: $POLYTASK_ORT_THREADS, else the CPUs this process may use.

    ORT's own default counts the host's cores, not the container's (DESIGN section 4); with
    several workers on one machine set POLYTASK_ORT_THREADS to cores / workers.
    """
    env = os.environ if env is None else env
    raw = env.get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer") from None
        if value < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_providers(requested: str, available: list[str]) -> list[str]:
    """onnxruntime execution providers for `requested` ("auto", "cpu" or "cuda").

    CUDA is used when it is requested ("cuda" or "auto") and onnxruntime has it (the
    onnxruntime-gpu wheel); CPU stays as the fallback for ops CUDA lacks. "cuda" without a CUDA
    provider logs a warning and runs on CPU rather than refusing to serve.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={requested!r}: expected 'auto', 'cpu' or 'cuda'")
    if requested != "cpu" and CUDA in available:
        return [CUDA, CPU]
    if requested == "cuda":
        logger.warning("CUDA requested but onnxruntime has no %s; running on CPU", CUDA)
    return [CPU]


def ort_spinning(env: dict[str, str] | None = None) -> bool:
    """Whether onnxruntime's idle intra-op threads spin: $POLYTASK_ORT_SPINNING ("1" or "0",
    default "0").

    Spinning saves microseconds between operators on a machine of its own, but on shared
    cores it burns CPU the tokenizer, the HTTP workers and other processes need.
    """
    env = os.environ if env is None else env
    raw = env.get(SPINNING_ENV, "0").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{SPINNING_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


def session_options(threads: int | None = None, spinning: bool | None = None) -> Any:
    """onnxruntime session options as polytask runs every graph: `threads` intra-op threads
    (default `ort_threads()`), one inter-op thread, spinning as `ort_spinning()` unless given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or ort_threads()
    options.inter_op_num_threads = 1
    spin = ort_spinning() if spinning is None else spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def ort_parallel(env: dict[str, str] | None = None) -> bool:
    """Whether calls with enough work run their buckets data-parallel on single-threaded
    sessions: $POLYTASK_ORT_PARALLEL ("1" or "0", default "1"; see the module docstring)."""
    env = os.environ if env is None else env
    raw = env.get(PARALLEL_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{PARALLEL_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


def ort_split(env: dict[str, str] | None = None) -> bool:
    """Whether the data-parallel path runs the graph in two parts, the encoder per bucket and
    the heads once per call: $POLYTASK_ORT_SPLIT ("1" or "0", default "1"; see the module
    docstring)."""
    env = os.environ if env is None else env
    raw = env.get(SPLIT_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{SPLIT_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


def parallel_workers(providers: list[str], threads: int, enabled: bool) -> int:
    """How many single-threaded session calls a Runtime runs at once: `threads` on the CPU
    provider when the parallel path is `enabled`, else 1 (every call on one multi-threaded
    session). CUDA runs one call at a time: the GPU already splits each GEMM across its cores."""
    if not enabled or providers[0] != CPU or threads < 2:
        return 1
    return threads


def cpu_session(
    path: str | Path, threads: int | None = None, parallel: bool | None = None
) -> tuple[Any, int]:
    """An onnxruntime CPU session of the graph at `path` for batch work (the training
    caches), and how many calls may run on it at once: `threads` (default `ort_threads()`)
    single-threaded calls when data-parallel (`parallel`, default `ort_parallel()`), else one
    call at a time on `threads` intra-op threads."""
    import onnxruntime as ort

    threads = threads or ort_threads()
    workers = parallel_workers([CPU], threads, ort_parallel() if parallel is None else parallel)
    options = session_options(1 if workers > 1 else threads)
    return ort.InferenceSession(str(path), options, providers=[CPU]), workers


def plan_buckets(
    lengths: np.ndarray,
    max_size: int = CHUNK_SIZE,
    overhead: int = RUN_OVERHEAD_TOKENS,
    max_tokens: int | None = None,
) -> list[tuple[int, int]]:
    """Split texts sorted by length (ascending) into consecutive buckets, each padded to its
    longest text, at the least total cost: per bucket, `overhead` plus its padded positions
    (size x longest length). Dynamic programming over the split points, O(n x max_size).
    `max_tokens` also bounds a bucket's padded positions (a single text is always allowed).

    Returns:
        [start, end) index pairs into `lengths`, in order, each at most `max_size` long.
    """
    n = len(lengths)
    if n == 0:
        return []
    lengths = np.asarray(lengths, dtype=np.int64)
    best = np.zeros(n + 1, dtype=np.int64)  # best[i]: least cost of the first i texts
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[i]: where the last bucket of best[i] starts
    for end in range(1, n + 1):
        starts = np.arange(max(0, end - max_size), end)
        if max_tokens is not None:
            starts = starts[(end - starts) * lengths[end - 1] <= max_tokens]
            if len(starts) == 0:
                starts = np.array([end - 1])
        costs = best[starts] + overhead + (end - starts) * lengths[end - 1]
        k = int(np.argmin(costs))
        best[end], cut[end] = costs[k], starts[k]
    buckets: list[tuple[int, int]] = []
    end = n
    while end > 0:
        buckets.append((int(cut[end]), end))
        end = int(cut[end])
    return buckets[::-1]


def bucket_cost(lengths: np.ndarray, bucket: tuple[int, int], overhead: int) -> int:
    """What `plan_buckets` charges a bucket of texts sorted by length: `overhead` plus its
    padded positions."""
    start, end = bucket
    return overhead + (end - start) * int(lengths[end - 1])


def plan_parallel(
    lengths: np.ndarray,
    buckets: list[tuple[int, int]],
    workers: int,
    speedup: float = MULTI_THREAD_SPEEDUP,
    overhead: int = RUN_OVERHEAD_TOKENS,
) -> list[tuple[int, int]] | None:
    """The work units for `workers` concurrent single-threaded calls, or None when the call
    should run sequentially on the multi-threaded session: one worker, a single unit (one
    text), or units so uneven that the last to finish (`makespan`, one thread each) would
    take longer than all buckets on the multi-threaded session (their cost / `speedup`).

    The largest bucket is split in two (its shorter half padded only to its own longest text)
    while that shortens the makespan, so one worker is not left computing a big bucket while
    the other idles. The units come largest first: handed to the workers in that order, the
    last ones to start are the shortest.

    Args:
        lengths: Token counts of the texts, sorted ascending (as for `plan_buckets`).
        buckets: `plan_buckets(lengths)`.
    """
    if workers < 2 or not buckets:
        return None
    units = balance(lengths, buckets, workers, overhead)
    costs = [bucket_cost(lengths, b, overhead) for b in units]
    total = sum(bucket_cost(lengths, b, overhead) for b in buckets)
    if len(units) < 2 or makespan(costs, workers) * speedup >= total:
        return None
    return units


def balance(
    lengths: np.ndarray,
    buckets: list[tuple[int, int]],
    workers: int,
    overhead: int = RUN_OVERHEAD_TOKENS,
) -> list[tuple[int, int]]:
    """`buckets` as work units for `workers` at once, costliest first: the costliest split
    in two (its shorter half padded only to its own longest text) while that brings the
    last worker's finish (`makespan`) forward."""

    def costs(units: list[tuple[int, int]]) -> list[int]:
        return [bucket_cost(lengths, b, overhead) for b in units]

    def by_cost(units: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return sorted(units, key=lambda b: bucket_cost(lengths, b, overhead), reverse=True)

    units = by_cost(buckets)
    while units and units[0][1] - units[0][0] >= 2 and workers > 1:
        start, end = units[0]
        mid = (start + end) // 2
        split = by_cost([(start, mid), (mid, end), *units[1:]])
        if makespan(costs(split), workers) >= makespan(costs(units), workers):
            break
        units = split
    return units


def makespan(costs: list[int], workers: int) -> int:
    """When the last of `workers` finishes, each taking the next of `costs` (largest first)
    as soon as it is free."""
    loads = [0] * workers
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of several texts as one batch padded to the longest (at least 1 position,
    so an empty text gets an all-padding row): input_ids and attention_mask, int64 [b, L]."""
    width = max(max((len(r) for r in rows), default=0), 1)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax [n, classes], stable for large logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_label_map(logits: np.ndarray, knots_x: np.ndarray, knots_y: np.ndarray) -> np.ndarray:
    """Probabilities [n, C] after a top-label map (metadata `temperature+isotonic`): each
    row's answered class keeps its label and takes the probability the map gives its softmax
    probability (knots `knots_x` -> `knots_y`, linear between them, flat beyond); the other
    classes share the rest in the softmax's own proportions. The top probability is raised
    where needed so the runner-up stays below it: the answer never changes, only how sure it
    is.

    Args:
        logits: [n, C] logits already divided by the task's temperature.
    """
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(z))
    k = z.argmax(axis=-1)
    top = softmax(z)[rows, k]
    mapped = np.interp(top, knots_x, knots_y)
    others = z.copy()
    others[rows, k] = -np.inf
    share = softmax(others)  # the other classes' proportions among themselves (top: 0)
    runner_up = share.max(axis=-1)
    # top > (1 - top) x runner_up  <=>  top > runner_up / (1 + runner_up): step just over it
    mapped = np.clip(np.maximum(mapped, runner_up / (1 + runner_up) + 1e-6), 0.0, 1.0)
    out = share * (1 - mapped)[:, None]
    out[rows, k] = mapped
    return out


# --------------------------------------------------------------------------- continuous batching
@dataclass(eq=False)
class _Call:
    """One `Runtime.run` call's texts in the scheduler: filled in by the workers."""

    ids: list[list[int]]  # [n] token ids
    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    # (row indices into this call, per output [rows, ...]) of each bucket that held them
    results: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)
    runs: int = 0  # session.run calls that computed some of its texts
    positions: int = 0  # their padded positions that were this call's rows
    error: BaseException | None = None


class BucketScheduler:
    """Continuous batching for the data-parallel path: up to `workers` threads, each running
    one single-threaded `session.run` at a time, take buckets from the texts of every call
    submitted so far, pooled and sorted by length.

    Buckets are planned over everything pending when a call arrives (`plan_buckets`, at most
    `max_size` texts and `max_tokens` padded positions each). A free worker splits them among
    the free workers as `plan_parallel` does (`balance`) and takes the costliest unit that
    holds a text of the oldest call: calls finish in about the order they came, longest-first evens the workers'
    loads, and a small call still uses every core. A worker never waits for more texts: under
    load the pool is large and buckets fill; alone, a call runs at once.

    Threads start on demand and exit after `idle_exit_s` without work, so a Runtime dropped on
    a model swap leaves no thread behind.

    Args:
        run_bucket: Computes one bucket: (ids, mask), int64 [b, L] each -> one array per
            output, rows in the bucket's order (every task's logits, or the encoder part's
            outputs when the runtime runs the heads per call).
    """

    def __init__(
        self,
        run_bucket: Callable[[np.ndarray, np.ndarray], list[np.ndarray]],
        workers: int,
        pad_id: int = 0,
        max_size: int = CHUNK_SIZE,
        max_tokens: int | None = RUN_MAX_TOKENS,
        overhead: int = RUN_OVERHEAD_TOKENS,
        idle_exit_s: float = 10.0,
    ) -> None:
        self._run_bucket = run_bucket
        self.workers = workers
        self.pad_id = pad_id
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.overhead = overhead
        self.idle_exit_s = idle_exit_s
        self._cv = threading.Condition()
        # (length, call number, call, row): sorted by length, then by arrival
        self._pending: list[tuple[int, int, _Call, int]] = []
        # The pending texts' buckets, [start, end) into `_pending`, planned when texts arrive
        # and kept as units are taken (planning all of a 5,000-text call again for each of
        # its ~200 buckets took a third of its time), and their token counts.
        self._plan: list[tuple[int, int]] = []
        self._lengths = np.zeros(0, dtype=np.int64)
        self._busy = 0
        self._threads = 0
        self._numbers = itertools.count()
        self._names = itertools.count()

    @property
    def idle(self) -> bool:
        """Nothing pending and no worker computing."""
        with self._cv:
            return not self._pending and self._busy == 0

    def submit(self, lengths: np.ndarray, ids: list[list[int]]) -> _Call:
        """Compute these texts (token counts and ids); returns once every one is done.

        Raises:
            Whatever a session.run computing one of its texts raised.
        """
        call = _Call(ids=ids, remaining=len(ids))
        if not ids:
            return call
        with self._cv:
            number = next(self._numbers)
            self._pending.extend((int(n), number, call, row) for row, n in enumerate(lengths))
            self._pending.sort(key=lambda e: (e[0], e[1]))
            self._lengths = np.fromiter((max(e[0], 1) for e in self._pending), dtype=np.int64)
            self._plan = plan_buckets(self._lengths, self.max_size, self.overhead, self.max_tokens)
            while self._threads < self.workers:
                self._threads += 1
                threading.Thread(
                    target=self._work, name=f"polytask-ort_{next(self._names)}", daemon=True
                ).start()
            self._cv.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call

    def _take(self) -> list[tuple[int, int, _Call, int]]:
        """The next bucket's entries, removed from the pending ones (under the lock)."""
        # Split among the free workers (this one included) as `plan_parallel` would; the
        # units are a partition of the pending texts too, and become the plan.
        units = balance(self._lengths, self._plan, self.workers - self._busy, self.overhead)
        oldest = min(e[1] for e in self._pending)
        start, end = next(
            u for u in units if any(e[1] == oldest for e in self._pending[u[0] : u[1]])
        )
        taken = self._pending[start:end]
        del self._pending[start:end]
        self._lengths = np.delete(self._lengths, np.s_[start:end])
        size = end - start
        self._plan = sorted(
            (a - size, b - size) if a >= end else (a, b) for a, b in units if (a, b) != (start, end)
        )
        return taken

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    if not self._cv.wait(self.idle_exit_s) and not self._pending:
                        self._threads -= 1
                        return
                taken = self._take()
                self._busy += 1
            width = max(max(e[0] for e in taken), 1)  # as pad_batch pads
            error: BaseException | None = None
            logits: list[np.ndarray] = []
            try:
                ids, mask = pad_batch([call.ids[row] for _, _, call, row in taken], self.pad_id)
                logits = self._run_bucket(ids, mask)
            except BaseException as err:  # handed to the calls; the worker carries on
                error = err
            with self._cv:
                self._busy -= 1
                by_call: dict[_Call, list[int]] = {}
                for i, (_, _, call, _) in enumerate(taken):
                    by_call.setdefault(call, []).append(i)
                for call, rows in by_call.items():
                    if error is not None:
                        call.error = call.error or error
                    else:
                        picked = np.array(rows)
                        call.results.append(
                            (np.array([taken[i][3] for i in rows]), [out[picked] for out in logits])
                        )
                    call.runs += 1
                    call.positions += len(rows) * width
                    call.remaining -= len(rows)
                    if call.remaining == 0:
                        call.done.set()


# --------------------------------------------------------------------------- runtime
def _split_or_none(path: Path) -> Any:
    """`serving.graph.split_heads(path)`, or None (logged) where the graph cannot be cut or
    the cut fails: the whole graph then runs per bucket, as before the split existed."""
    from serving.graph import split_heads

    try:
        parts = split_heads(path)
    except Exception as err:  # an odd graph costs speed, never the service
        logger.warning("%s: running the whole graph per bucket (cut failed: %s)", path, err)
        return None
    if parts is None:
        logger.info("%s: running the whole graph per bucket (no clean cut)", path)
    return parts


class Runtime:
    """A loaded artifact: tokenizer, onnxruntime session(s) and metadata.

    Thread-safe for `run` and `predict` (onnxruntime sessions and tokenizers are). On the
    data-parallel path, concurrent calls share one `BucketScheduler`: their texts are pooled
    into the same buckets, so several calls at once compute faster than one after another.

    Args:
        artifact_dir: Directory with model.onnx, tokenizer.json and metadata.json.
        version: The version reported with predictions (the model store tag); default the
            metadata's `model_name:run_id`.
        threads: onnxruntime intra-op threads; default `ort_threads()`.
        device: "auto", "cpu" or "cuda"; default $POLYTASK_ORT_DEVICE, else "auto".
        spinning: whether idle intra-op threads spin; default `ort_spinning()`.
        parallel: whether calls with enough work run data-parallel on `threads`
            single-threaded calls (a second session, with one intra-op thread; CPU only);
            default `ort_parallel()`.
        split: whether the data-parallel path runs the encoder part per bucket and the heads
            once per call (`serving.graph.split_heads`); default `ort_split()`. A graph that
            cannot be cut runs whole.
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        version: str | None = None,
        threads: int | None = None,
        device: str | None = None,
        spinning: bool | None = None,
        parallel: bool | None = None,
        split: bool | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.artifact_dir = Path(artifact_dir)
        self.metadata = ArtifactMetadata.read(self.artifact_dir)
        self.version = version or f"{self.metadata.model_name}:{self.metadata.run_id}"
        # The artifact's own regular files: a symbolic link is refused (`artifact_file`).
        onnx_path = artifact_file(self.artifact_dir, ONNX_FILE)
        tokenizer_path = artifact_file(self.artifact_dir, TOKENIZER_FILE)
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise ArtifactError(f"{tokenizer_path}: not a tokenizer: {err}") from err
        # A client's "[SEP]" or "[PAD]" is text, not the special token: otherwise a request
        # could put separators or padding inside a sentence, which training never shows the
        # model. Training tokenizes the same way (`pipeline.features.load_tokenizer`).
        self.tokenizer.encode_special_tokens = True
        max_length = self.metadata.encoder.max_length
        if self.tokenizer.truncation is None:
            # Older artifacts: truncation is part of the contract, not optional.
            self.tokenizer.enable_truncation(max_length)
        elif self.tokenizer.truncation["max_length"] != max_length:
            # The export writes both; texts cut by one length and reported by the other.
            raise ArtifactError(
                f"{tokenizer_path}: truncation max_length {self.tokenizer.truncation['max_length']}"
                f" differs from {METADATA_FILE} field encoder.max_length {max_length}"
            )
        # Padding is done here, per length bucket, not by the tokenizer (to the longest text).
        padding = self.tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        self.tokenizer.no_padding()
        self.labels: dict[str, list[str]] = {t.name: list(t.labels) for t in self.metadata.tasks}
        self.outputs: dict[str, str] = {t.name: t.output for t in self.metadata.tasks}
        options = session_options(threads, spinning)
        self.providers = choose_providers(
            device or os.environ.get(DEVICE_ENV, "auto"), ort.get_available_providers()
        )
        self.session = ort.InferenceSession(str(onnx_path), options, providers=self.providers)
        check_outputs(self.session, self.metadata, self.artifact_dir)
        # The data-parallel path: one single-threaded session (ORT sessions take concurrent
        # run calls; with one intra-op thread each call computes on its caller's thread) and
        # a thread per core to call it. It holds a second copy of the weights.
        self.workers = parallel_workers(
            self.providers,
            options.intra_op_num_threads,
            ort_parallel() if parallel is None else parallel,
        )
        self.single_session: Any = None
        self.scheduler: BucketScheduler | None = None
        # With the graph split: the session of the heads part, and the tensors the encoder
        # part hands it (what a bucket's run returns); else None and every task's output.
        self.heads_session: Any = None
        self._bucket_outputs: list[str] = [self.outputs[t] for t in self.labels]
        if self.workers > 1:
            parts = None
            if ort_split() if split is None else split:
                parts = _split_or_none(self.artifact_dir / ONNX_FILE)
            single = session_options(1, spinning)
            if parts is not None:
                try:  # onnxruntime checks the parts' declared boundary types here
                    encoder = ort.InferenceSession(parts.encoder, single, providers=self.providers)
                    heads = ort.InferenceSession(parts.heads, single, providers=self.providers)
                except Exception as err:  # noqa: BLE001 - a cut that does not load: run whole
                    logger.warning(
                        "%s: running the whole graph per bucket (a part does not load: %s)",
                        self.artifact_dir,
                        err,
                    )
                else:
                    if self._cut_holds(encoder, heads, parts.boundary):
                        self.single_session, self.heads_session = encoder, heads
                        self._bucket_outputs = parts.boundary
                    del encoder, heads
                del parts
            if self.single_session is None:
                self.single_session = ort.InferenceSession(
                    str(self.artifact_dir / ONNX_FILE), single, providers=self.providers
                )
            self.scheduler = BucketScheduler(self._run_single, self.workers, self.pad_id)
        # Held while a call runs on the multi-threaded session beside the scheduler.
        self._multi_lock = threading.Lock()
        # Temperature scaling per task head (metadata.json; 1.0 for artifacts without it).
        self.temperatures: dict[str, float] = {
            t.name: t.calibration.temperature if t.calibration is not None else 1.0
            for t in self.metadata.tasks
        }
        # A top-label map after the temperature, for tasks whose calibration chose one.
        self.top_label_maps: dict[str, tuple[np.ndarray, np.ndarray]] = {
            t.name: (np.asarray(t.calibration.knots_x), np.asarray(t.calibration.knots_y))
            for t in self.metadata.tasks
            if t.calibration is not None and t.calibration.knots_x is not None
        }
        logger.info(
            "loaded %s (%s, %d tasks, %d threads, %s, %s)",
            self.version,
            self.metadata.precision,
            len(self.labels),
            options.intra_op_num_threads,
            self.providers[0],
            (
                f"{self.workers} data-parallel calls"
                + (", heads once per call" if self.heads_session is not None else "")
                if self.workers > 1
                else "no data parallelism"
            ),
        )

    def _cut_holds(self, encoder: Any, heads: Any, boundary: list[str]) -> bool:
        """Whether the two parts compute what the whole graph does, row by row: probe texts
        in batches of 1 and 3, each boundary tensor one row per text, the heads' logits
        within float tolerance of the whole graph's. A graph the cut gets wrong (a boundary
        tensor that is not per text, as an int8 graph's activation scale) runs whole."""
        outputs = [self.outputs[t] for t in self.labels]
        for texts in (CHECK_TEXTS[:1], CHECK_TEXTS[:3]):
            ids, mask = pad_batch(
                [e.ids for e in self.tokenizer.encode_batch(list(texts))], self.pad_id
            )
            feeds = {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}
            try:
                middle = encoder.run(boundary, feeds)
                if any(m.ndim == 0 or m.shape[0] != len(texts) for m in middle):
                    raise ValueError("a boundary tensor is not one row per text")
                split = heads.run(outputs, dict(zip(boundary, middle, strict=True)))
            except Exception as err:
                logger.warning(
                    "%s: running the whole graph per bucket (%s)", self.artifact_dir, err
                )
                return False
            whole = self.session.run(outputs, feeds)
            if not all(
                np.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(split, whole, strict=True)
            ):
                logger.warning(
                    "%s: running the whole graph per bucket (its parts differ from it)",
                    self.artifact_dir,
                )
                return False
        return True

    @property
    def task_names(self) -> list[str]:
        return list(self.labels)

    def _run_single(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """One bucket on the single-threaded session: every task's logits, or with the graph
        split the encoder part's outputs (the scheduler's workers call this; a session looked
        up per call, so tests can replace it)."""
        return self.single_session.run(
            self._bucket_outputs, {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}
        )

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        """The tasks to answer: all when None; UnknownTaskError names any the model lacks."""
        if tasks is None:
            return self.task_names
        unknown = [t for t in tasks if t not in self.labels]
        if unknown:
            raise UnknownTaskError(
                f"unknown task(s) {unknown}; this model's tasks are {self.task_names}"
            )
        return list(dict.fromkeys(tasks))

    def run(
        self, texts: list[str], tasks: list[str] | None = None, parallel: bool | None = None
    ) -> BatchOutput:
        """Probabilities of `tasks` (default all) for `texts`: one encoder pass per bucket.

        Texts are tokenized, sorted by token count and split into buckets (`plan_buckets`), each
        padded only to its own longest text, so little compute goes to padding; results come
        back in input order, equal to running each text alone (within float tolerance). On the
        data-parallel path the buckets come from the shared `BucketScheduler` (see the module
        docstring), unless the call is one text or one long text dominates it
        (`plan_parallel` is None) and nothing else is running; `parallel=False` forces the
        sequential path for this call (tests and benchmarks).
        """
        tasks = self.check_tasks(tasks)
        n = len(texts)
        probs = {t: np.zeros((n, len(self.labels[t])), dtype=np.float32) for t in tasks}
        raw = {t: np.zeros((n, len(self.labels[t])), dtype=np.float32) for t in tasks}
        truncated = np.zeros(n, dtype=bool)
        if n == 0:
            return BatchOutput(probs, truncated, self.version, logits=raw)
        # Every task's logits, in model order: the scheduler's buckets hold texts of calls
        # that asked for other tasks, and a subset would save only a few heads' matmuls.
        outputs = [self.outputs[t] for t in self.labels]
        cut = self.metadata.encoder.max_length * CHARS_PER_TOKEN
        enc = self.tokenizer.encode_batch([t[:cut] for t in texts])
        lengths = np.array([len(e.ids) for e in enc], dtype=np.int64)
        # The tokenizer keeps what truncation cut off in `overflowing`.
        truncated[:] = [
            bool(e.overflowing) or len(t) > cut for e, t in zip(enc, texts, strict=True)
        ]
        order = np.argsort(lengths, kind="stable")
        sorted_lengths = lengths[order]
        units = plan_buckets(sorted_lengths)
        scheduler = self.scheduler if parallel is not False else None
        # One text, or a call one long text dominates, is answered sooner by the
        # multi-threaded session, one call at a time (two calls on it at once would share its
        # one intra-op pool); but only while the scheduler is idle, whose threads would
        # compete for the same cores.
        alone = False
        if (
            scheduler is not None
            and plan_parallel(sorted_lengths, units, self.workers) is None
            and scheduler.idle
        ):
            self._multi_lock.acquire()
            alone = True
            scheduler = None

        if scheduler is not None:
            done = scheduler.submit(lengths, [e.ids for e in enc])
            results = done.results
            if self.heads_session is not None:
                results = self._run_heads(results, n, outputs)
            runs, positions = done.runs, done.positions
        else:
            try:
                results = self._sequential(enc, order, units, outputs)
            finally:
                if alone:
                    self._multi_lock.release()
            runs = len(units)
            width = np.maximum(sorted_lengths, 1)  # as a bucket pads an empty text
            positions = sum((end - start) * int(width[end - 1]) for start, end in units)
        for idx, logits in results:
            by_task = dict(zip(self.labels, logits, strict=True))  # every task, model order
            for task in tasks:
                raw[task][idx] = by_task[task]
                probs[task][idx] = softmax(
                    by_task[task].astype(np.float32) / self.temperatures[task]
                )
        for task in tasks:
            if task in self.top_label_maps:
                probs[task] = top_label_map(
                    raw[task] / self.temperatures[task], *self.top_label_maps[task]
                ).astype(np.float32)
        return BatchOutput(
            probs,
            truncated,
            self.version,
            int(lengths.sum()),
            padded_tokens=positions - int(lengths.sum()),
            runs=runs,
            logits=raw,
        )

    def _run_heads(
        self,
        parts: list[tuple[np.ndarray, list[np.ndarray]]],
        n: int,
        outputs: list[str],
    ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Every task's logits from the encoder part's outputs of a call's buckets (row
        indices, arrays): gathered into input order, then the heads part on all `n` rows, in
        chunks of HEADS_CHUNK (one run for a request; a 5,000-text evaluation stays bounded)."""
        gathered: list[np.ndarray | None] = [None] * len(self._bucket_outputs)
        for idx, arrays in parts:
            for k, array in enumerate(arrays):
                if gathered[k] is None:
                    gathered[k] = np.empty((n, *array.shape[1:]), dtype=array.dtype)
                gathered[k][idx] = array
        results = []
        for start in range(0, n, HEADS_CHUNK):
            feeds = {
                name: g[start : start + HEADS_CHUNK]
                for name, g in zip(self._bucket_outputs, gathered, strict=True)
            }
            rows = np.arange(start, min(start + HEADS_CHUNK, n))
            results.append((rows, self.heads_session.run(outputs, feeds)))
        return results

    def _sequential(
        self,
        enc: list[Any],
        order: np.ndarray,
        units: list[tuple[int, int]],
        outputs: list[str],
    ) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """One bucket at a time on the multi-threaded session: per bucket, the texts'
        indices (into `enc`) and every task's logits, in model order."""
        results = []
        for start, end in units:
            idx = order[start:end]  # texts order[start:end], padded to their longest
            ids, mask = pad_batch([enc[i].ids for i in idx], self.pad_id)
            feeds = {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}
            results.append((idx, self.session.run(outputs, feeds)))
        return results

    def predict(
        self, texts: list[str], tasks: list[str] | None = None, return_all: bool = False
    ) -> Prediction:
        """Every requested task's label and probability for each text.

        Args:
            texts: The texts (validated by the caller: non-empty strings).
            tasks: A subset of the model's tasks; default all.
            return_all: Also return every label's probability.

        Raises:
            UnknownTaskError: a task the model does not have.
        """
        out = self.run(texts, tasks)
        return Prediction(
            results=decode(out, self.labels, return_all), model_version=out.model_version
        )

    def describe(self) -> dict[str, Any]:
        """Tasks with their labels, dev metrics and calibration, and the model version."""
        return {
            "model_version": self.version,
            "precision": self.metadata.precision,
            "max_length": self.metadata.encoder.max_length,
            "tasks": {
                t.name: {
                    "labels": list(t.labels),
                    "dev_accuracy": t.dev.accuracy if t.dev is not None else None,
                    "calibration": _describe_calibration(t.calibration),
                }
                for t in self.metadata.tasks
            },
        }


def _describe_calibration(c: Calibration | None) -> dict[str, float | str] | None:
    """A task's calibration method, temperature and dev ECE before/after (percent), for
    /tasks."""
    if c is None:
        return None
    return {
        "method": c.method,
        "temperature": c.temperature,
        "ece_before": c.ece_before,
        "ece_after": c.ece_after,
    }


def decode(
    out: BatchOutput, labels: dict[str, list[str]], return_all: bool = False
) -> list[TextPrediction]:
    """Per text, per task: the argmax label and its probability (and all, on request)."""
    results: list[TextPrediction] = []
    best = {t: p.argmax(axis=-1) for t, p in out.probabilities.items()}
    for i in range(len(out.truncated)):
        answers: dict[str, TaskPrediction] = {}
        for task, p in out.probabilities.items():
            k = int(best[task][i])
            answers[task] = TaskPrediction(
                label=labels[task][k],
                probability=float(p[i, k]),
                probabilities=(
                    {lab: float(v) for lab, v in zip(labels[task], p[i], strict=True)}
                    if return_all
                    else None
                ),
            )
        results.append(TextPrediction(tasks=answers, truncated=bool(out.truncated[i])))
    return results


# --------------------------------------------------------------------------- model check
# Known texts every model must answer before it is promoted or served: plain, a question,
# one word, one far beyond any max length (truncated), and non-ASCII.
CHECK_TEXTS = (
    "a gripping , funny and moving film .",
    "what is the capital of france ?",
    "ok",
    "the service must answer this text too , however long it gets . " * 40,
    "un film très émouvant ☃",
)


# Probabilities closer than this (absolute) count as the same answer. Different texts move a
# working model's probabilities by far more; the same text in another row of a batch, padded
# otherwise, moves them by float32 rounding (~1e-7).
SAME_ANSWER_ATOL = 1e-6


class ModelCheckError(ValueError):
    """An artifact that cannot be loaded, or whose answers are not probabilities, or are the
    same for every text; the message names the model and says why."""


def check_outputs(session: Any, metadata: ArtifactMetadata, artifact_dir: Path) -> None:
    """Check that model.onnx has every task's logits output, and, where the graph declares its
    width, that it is as wide as the task's `labels`: one label too many or too few would
    name every answer after the wrong class.

    Raises:
        ArtifactError: an output is missing, or a width differs from the labels' count; every
            task at fault is named.
    """
    widths = {o.name: o.shape[-1] if o.shape else None for o in session.get_outputs()}
    missing = [t.output for t in metadata.tasks if t.output not in widths]
    if missing:
        raise ArtifactError(
            f"{artifact_dir / ONNX_FILE}: lacks the outputs {missing} that {METADATA_FILE} names"
        )
    errors = [
        f"field tasks.{i}.labels: task {t.name} has {len(t.labels)} labels, but the "
        f"{ONNX_FILE} output {t.output} gives {widths[t.output]} logits"
        for i, t in enumerate(metadata.tasks)
        if isinstance(widths[t.output], int) and widths[t.output] != len(t.labels)
    ]
    if errors:
        raise ArtifactError(f"{artifact_dir / METADATA_FILE}: " + "; ".join(errors))


def _check_vocabulary(runtime: Runtime) -> None:
    """Refuse a tokenizer.json with ids beyond the graph's embedding table: it would load and
    then fail on every request that holds such a word (the known texts hit few ids). The
    graph runs once on one text of the tokenizer's largest id between its special tokens; on
    other providers than the CPU, where an id beyond the table does not fail (CUDA's Gather
    returns zeros for it), the table's rows are also read from model.onnx."""
    top = max(runtime.tokenizer.get_vocab(with_added_tokens=True).values())
    refused = f"{runtime.version}: {TOKENIZER_FILE} has token ids up to {top} that {ONNX_FILE}"
    if runtime.providers[0] != CPU:
        rows = _embedding_rows(runtime.artifact_dir / ONNX_FILE)
        if rows is not None and top >= rows:
            raise ModelCheckError(f"{refused} cannot embed: its embedding table has {rows} rows")
    enc = runtime.tokenizer.encode("ok")
    pairs = zip(enc.ids, enc.special_tokens_mask, strict=True)
    ids = [i if special else top for i, special in pairs]
    if top not in ids:  # "ok" itself a special token: no text position to put it in
        ids.append(top)
    feeds = {
        INPUT_NAMES[0]: np.asarray([ids], dtype=np.int64),
        INPUT_NAMES[1]: np.ones((1, len(ids)), dtype=np.int64),
    }
    try:
        runtime.session.run([runtime.outputs[t] for t in runtime.labels], feeds)
    except Exception as err:
        raise ModelCheckError(f"{refused} cannot embed: {type(err).__name__}: {err}") from err


def _embedding_rows(path: Path) -> int | None:
    """Rows of the table the graph looks `input_ids` up in (a Gather along axis 0 of an
    initializer by that input), or None where the graph shows none."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    rows = [
        dims[node.input[0]][0]
        for node in proto.graph.node
        if node.op_type == "Gather"
        and list(node.input[1:]) == [INPUT_NAMES[0]]
        and dims.get(node.input[0])
        and all(a.i == 0 for a in node.attribute if a.name == "axis")
    ]
    return min(rows) if rows else None


def check_answers(runtime: Runtime, texts: tuple[str, ...] = CHECK_TEXTS) -> None:
    """Answer `texts` with every task and check each answer is a probability distribution,
    that the graph embeds every id the tokenizer can give, and that the texts do not all get
    the same answer.

    Raises:
        ModelCheckError: the model fails on the texts, or a task's probabilities are not
            [len(texts), labels], finite, in [0, 1] and summing to 1 per text; the graph
            fails on the tokenizer's largest id; or every task answers every text alike (as
            with a huge temperature, or texts cut to nothing).
    """
    try:
        out = runtime.run(list(texts))
    except Exception as err:
        raise ModelCheckError(
            f"{runtime.version}: fails on known texts: {type(err).__name__}: {err}"
        ) from err
    for task, labels in runtime.labels.items():
        p = out.probabilities.get(task)
        if p is None or p.shape != (len(texts), len(labels)):
            shape = None if p is None else p.shape
            raise ModelCheckError(
                f"{runtime.version}: task {task}: probabilities of shape {shape}, expected "
                f"{(len(texts), len(labels))}"
            )
        if not np.isfinite(p).all():
            raise ModelCheckError(f"{runtime.version}: task {task}: non-finite outputs (NaN/inf)")
        in_range = ((p >= -1e-6) & (p <= 1 + 1e-6)).all()
        if not in_range or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
            raise ModelCheckError(f"{runtime.version}: task {task}: outputs are not probabilities")
    _check_vocabulary(runtime)
    probs = [out.probabilities[t] for t in runtime.labels]
    if len(texts) > 1 and all(np.allclose(p, p[0], rtol=0, atol=SAME_ANSWER_ATOL) for p in probs):
        raise ModelCheckError(
            f"{runtime.version}: answers every known text the same (every task's "
            f"probabilities equal on all {len(texts)} check texts); texts may not reach the "
            f"model ({TOKENIZER_FILE}, encoder.max_length "
            f"{runtime.metadata.encoder.max_length} in {METADATA_FILE}) or the temperatures "
            f"{runtime.temperatures} may flatten every answer"
        )


def load_checked(
    artifact_dir: str | Path,
    version: str | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> Runtime:
    """A Runtime of `artifact_dir` that answered `CHECK_TEXTS` correctly: what the service
    loads, and what promotion and the retraining gate check before labelling a model.

    Raises:
        ModelCheckError: the artifact cannot be loaded (a truncated model.onnx, missing files,
            bad metadata) or fails `check_answers`; the message keeps onnxruntime's reason.
    """
    try:
        runtime = Runtime(artifact_dir, version=version, threads=threads, device=device)
    except Exception as err:
        raise ModelCheckError(
            f"{version or artifact_dir}: cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    check_answers(runtime)
    return runtime
