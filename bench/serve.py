"""Serving benchmark: measures side by side, in one run on one machine, and prints ratios, each
throughput also as a share of the machine's own fp32 ceiling measured in the same run.

    (0) the ceiling: numpy's sgemm (float32 matmul) on the encoder's GEMM shapes, same thread
        count, best of several repetitions: GFLOP/s; and the FLOPs of the texts sent, counted
        from the encoder's shape (layers, width, FFN width) and the real token counts (no
        padding): 2·L·(4·d² + 2·d·d_ff) + 4·L²·d per layer for a text of L tokens, plus
        the served task heads' matmuls (2 FLOPs per weight of each task's answering path)
    (a) the six-task endpoint vs six single-task services (one `polytask serve` per task,
        each a full encoder pass), same clients, same concurrency: texts/s of complete
        answers (all six tasks per text); a single-task "answer" is six requests, sent at once
    (b) model engines: onnxruntime fp32 and dynamic int8 vs PyTorch eager, batch 1 and 32
        (texts/s, all tasks' logits, tokenization excluded; same thread count for all)
    (c) POST /predict at saturation (a real `polytask serve` on loopback) vs the raw ORT
        session at the same batch size, tokenization included on both sides; and the raw
        session on all texts sorted by length (the least padding a batch can have). Each
        twice, in alternating slices: buckets one at a time on the multi-threaded session
        (sequential, POLYTASK_ORT_PARALLEL=0, before issue 11 run 6) and data-parallel on
        single-threaded calls (the default now); two servers, one per setting. Also the
        data-parallel server with 4x the clients: its scheduler pools concurrent requests'
        texts, so more clients can still raise the throughput
    (d) p50 / p99 / max latency of 1-text requests sent at a fixed rate (open loop) for
        `--latency-seconds` (300 requests by default, so that p99 is not just the slowest
        one), the median of one request alone (sent one after another), and the first request
        after the server sat idle, on both servers of (c)

Every measured window opens after a second of the same load (`WARMUP_S`): on the machines this
was written on, an idle process's memory is slow to touch again for a while
(`bench/idle_memory.py`), and that start-up cost is reported in (d), not mixed into steady state.
    (e) frozen feature extraction on training texts (`--features N` of them, every task's train
        split interleaved): PyTorch eager in fixed length-sorted batches (how the feature cache
        ran first) vs PyTorch and onnxruntime in length buckets, onnxruntime sequential and
        data-parallel, and data-parallel in buckets of at most 512 padded positions (how it
        runs now); (e') the fine-tuning cache's token states of the bottom layers (all but
        the top 2), same texts, PyTorch eager vs onnxruntime, sequential and data-parallel
        (buckets of at most 512 positions)

Usage: with no argument it measures the latest run (`runs/latest`, its `artifact/` when
exported, else exported to a temporary directory); (a) runs only with one exported
single-task artifact per task of the run:

    python bench/serve.py [RUN] [--artifact DIR] [--seconds 8] \
        [--single mr=DIR --single cr=DIR ...]

Figures depend on the machine's load: compare ratios within one run, not across runs. Where
OPENBLAS_CORETYPE is set (older OpenBLAS builds need it on some CPUs), numpy's sgemm may be
slower than the machine can go, which flatters every share: unset it for this command alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Seconds of load before a measured window opens, so that the window sees steady state (see
# `_closed_loop`); the first request after idle is reported on its own in (d).
WARMUP_S = 1.0
sys.path.insert(0, str(REPO))


def dev_texts(data_dir: Path, limit: int = 2048) -> list[str]:
    """Dev texts of every task under data_dir, interleaved (realistic lengths)."""
    per_task = []
    for path in sorted(data_dir.glob("*/dev.jsonl")):
        per_task.append([json.loads(line)["text"] for line in path.open()])
    if not per_task:
        raise SystemExit(f"{data_dir}: no <task>/dev.jsonl files")
    out = [t for group in zip(*per_task, strict=False) for t in group]
    return out[:limit]


def interleaved_rates(fns: dict, n_items: int, seconds: float, rounds: int = 4) -> dict:
    """Items/s of each fn, measured in alternating slices so that load from elsewhere on the
    machine hits every engine alike."""
    done = dict.fromkeys(fns, 0.0)
    spent = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn()
                done[name] += n_items
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in fns}


def tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


# --------------------------------------------------------------------------- (0) ceiling
def matmul_ceiling(threads: int, dim: int, ffn: int, seconds: float = 3.0) -> float:
    """GFLOP/s of numpy's float32 matmul on the encoder's GEMM shapes ([M, d] x [d, d],
    [M, d] x [d, d_ff], [M, d_ff] x [d_ff, d] for M of 672 and 4,096 token rows), `threads`
    BLAS threads: the best over shapes and repetitions, so the ceiling errs high."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    shapes = [(m, k, n) for m in (672, 4096) for k, n in ((dim, dim), (dim, ffn), (ffn, dim))]
    best = 0.0
    per_shape = seconds / len(shapes)
    with threadpool_limits(threads):
        for m, k, n in shapes:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            a @ b  # warm-up
            stop = time.perf_counter() + per_shape
            while time.perf_counter() < stop:
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


class FlopCounter:
    """FLOPs of the encoder for given texts, from its shape and their real token counts."""

    def __init__(self, encoder_dir: Path, tokenizer) -> None:
        config = json.loads((Path(encoder_dir) / "config.json").read_text())
        self.layers = int(config["num_hidden_layers"])
        self.extra_layers = 0  # blocks served beside the encoder's (own paths' copies)
        self.dim = int(config["hidden_size"])
        self.ffn = int(config["intermediate_size"])
        self.tokenizer = tokenizer

    def per_text(self, tokens: int) -> float:
        d, f, n = self.dim, self.ffn, tokens
        blocks = self.layers + self.extra_layers
        return blocks * (2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d)

    def mean_gflop(self, texts: list[str]) -> float:
        """Mean GFLOP per text over `texts` (tokens as the model sees them: truncated, unpadded)."""
        lengths = [sum(e.attention_mask) for e in self.tokenizer.encode_batch(texts)]
        return float(np.mean([self.per_text(n) for n in lengths])) / 1e9


def own_blocks(run_dir: Path) -> int:
    """Transformer blocks the served graph runs beyond the encoder's: k per task routed to its
    own copy of the top k blocks (routing.own), from the run's record."""
    record = json.loads((Path(run_dir) / "run.json").read_text())
    return sum(
        (d.get("own") or {}).get("layers", 0)
        for d in (record.get("routing") or {}).values()
        if d.get("path") == "own"
    )


def heads_gflop(run_dir: Path) -> float:
    """GFLOP per text of the task heads the served graph runs: each task's answering path
    (R_i, B and A_i, or its private head; a private ensemble counts every member), two FLOPs
    per weight of each matrix. Small beside the encoder (about 1% with one private MLP per
    task, 3% with ensembles of five on senteval6), but work the service does."""
    from pipeline.runs import load_run

    heads = load_run(run_dir).model.heads
    total = 0
    for task in heads.tasks:
        if heads.routes[task] == "own":  # its blocks are the encoder's work (own_blocks)
            modules = [heads.own[task]]
        elif heads.routes[task] == "private":
            modules = [heads.private[task]]
        else:
            modules = [heads.shared, heads.towers[task]]
            total += 2 * heads.alignment[task].numel()
        for module in modules:
            total += sum(2 * p.numel() for p in module.parameters() if p.dim() >= 2)
    return total / 1e9


# --------------------------------------------------------------------------- (b) engines
def bench_engines(run_dir: Path, artifact: Path, texts: list[str], threads: int, seconds: float):
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    from pipeline.export import eager_logits, quantize_int8
    from pipeline.runs import load_run

    torch.set_num_threads(threads)
    model = load_run(run_dir).model.eval()
    tasks = list(model.heads.tasks)
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    int8 = scratch("bench-int8-") / "model.int8.onnx"
    quantize_int8(artifact / "model.onnx", int8)

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    fp32_s, int8_s = session(artifact / "model.onnx"), session(int8)
    outputs = [o.name for o in fp32_s.get_outputs()]
    rows = []
    for batch in (1, 32):
        feeds = tokenize(tokenizer, texts[:batch])
        r = interleaved_rates(
            {
                "torch": lambda f=feeds: eager_logits(
                    model, tasks, f["input_ids"], f["attention_mask"]
                ),
                "fp32": lambda f=feeds: fp32_s.run(outputs, f),
                "int8": lambda f=feeds: int8_s.run(outputs, f),
            },
            batch,
            seconds,
        )
        rows.append((batch, r))
    return rows


# --------------------------------------------------------------------------- (c), (d) service
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`polytask serve` on loopback with the artifact registered in a temporary store."""

    def __init__(self, artifact: Path, threads: int, env: dict[str, str] | None = None) -> None:
        # Its own model store and log, removed on exit (100+ MB with the model registered).
        self.home = Path(tempfile.mkdtemp(prefix="bench-bentoml-"))
        self.artifact = artifact
        self.threads = threads
        self.env = env or {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import httpx

        env = {**os.environ, "BENTOML_HOME": str(self.home), "BENTOML_DO_NOT_TRACK": "True"}
        code = (
            "import sys; from pipeline.export import register_artifact; "
            "print(register_artifact(sys.argv[1], 'polytask-bench'))"
        )
        registered = subprocess.run(
            [sys.executable, "-c", code, str(self.artifact)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if registered.returncode != 0:
            shutil.rmtree(self.home, ignore_errors=True)
            raise SystemExit(
                f"{self.artifact}: could not register it:\n{registered.stderr[-3000:]}"
            )
        tag = registered.stdout.split()[-1]
        env.update(POLYTASK_MODEL=tag, POLYTASK_ORT_THREADS=str(self.threads), **self.env)
        self.log = (self.home / "serve.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
            env=env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                # The log goes with the store: show its end here.
                self.__exit__()
                raise SystemExit(f"server did not start; the end of its log:\n{self.last_log}")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        self.last_log = (self.home / "serve.log").read_text(errors="replace")[-3000:]
        shutil.rmtree(self.home, ignore_errors=True)


def _closed_loop(
    texts: list[str], batch: int, concurrency: int, seconds: float, send, warmup: float = WARMUP_S
):
    """Texts/s in steady state and failed requests of `concurrency` closed-loop clients, each
    sending `batch`-text chunks with `send(http, fan, chunk) -> ok`.

    The clients are made before the clock starts, run `warmup` s before the measured window
    of `seconds` opens, and each request counts its texts in proportion to the part of it
    inside the window. Why the warm-up: on the machines this was written on, the host takes
    back an idle process's memory within seconds (`bench/idle_memory.py`), and a server that
    sat idle while the other one was measured pays ~0.2 s to fault its weights back in, which
    is start-up, not throughput. Failed requests count wherever they fall."""
    import httpx

    counted = [0.0] * concurrency
    errors = [0] * concurrency
    https = [httpx.Client(timeout=60) for _ in range(concurrency)]
    fans = [ThreadPoolExecutor(8) for _ in range(concurrency)]
    go = threading.Event()
    window: list[float] = []

    def client(k: int) -> None:
        i = k * batch
        go.wait()
        opens, closes = window
        while time.perf_counter() < closes:
            chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
            start = time.perf_counter()
            ok = send(https[k], fans[k], chunk)
            end = time.perf_counter()
            if not ok:
                errors[k] += 1
            else:
                inside = min(end, closes) - max(start, opens)
                if inside > 0:
                    counted[k] += batch * inside / (end - start)
            i += batch * concurrency

    workers = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for w in workers:
        w.start()
    now = time.perf_counter()
    window[:] = [now + warmup, now + warmup + seconds]
    go.set()
    for w in workers:
        w.join()
    for http, fan in zip(https, fans, strict=True):
        http.close()
        fan.shutdown()
    return sum(counted) / seconds, sum(errors)


def saturate(url: str, texts: list[str], batch: int, concurrency: int, seconds: float):
    """Texts/s of /predict with `batch`-text requests from `concurrency` closed-loop clients."""

    def send(http, fan, chunk) -> bool:
        return http.post(f"{url}/predict", json={"texts": chunk}).status_code == 200

    return _closed_loop(texts, batch, concurrency, seconds, send)


def saturate_split(urls: list[str], texts: list[str], batch: int, concurrency: int, seconds):
    """Like `saturate`, but each client's request goes to every url at once (one per
    single-task service) and counts when all have answered."""

    def send(http, fan, chunk) -> bool:
        codes = fan.map(lambda u: http.post(f"{u}/predict", json={"texts": chunk}), urls)
        return all(r.status_code == 200 for r in codes)

    return _closed_loop(texts, batch, concurrency, seconds, send)


def bench_split(artifact: Path, singles: dict[str, Path], texts, threads, args):
    """(a): texts/s of every task's answer, six-task endpoint vs one service per task."""
    from serving.artifact import ArtifactMetadata

    tasks = ArtifactMetadata.read(artifact).task_names
    for task, path in singles.items():
        if ArtifactMetadata.read(path).task_names != [task]:
            raise SystemExit(f"--single {task}={path}: not a single-task artifact of {task!r}")
    if sorted(singles) != sorted(tasks):
        raise SystemExit(f"--single: need one artifact per task {tasks}, got {sorted(singles)}")
    with Server(artifact, threads) as server:
        multi, multi_err = saturate(server.url, texts, args.batch, args.concurrency, args.seconds)
    # Six servers share the cores: each gets its share of the threads (more would only make
    # them fight over the same cores).
    share = max(1, threads // len(tasks))
    with ExitStack() as stack:
        servers = [stack.enter_context(Server(singles[t], share)) for t in tasks]
        split, split_err = saturate_split(
            [s.url for s in servers], texts, args.batch, args.concurrency, args.seconds
        )
    return multi, multi_err, split, split_err


def fixed_rate(
    url: str, texts: list[str], per_second: float, seconds: float, warmup: float = WARMUP_S
) -> dict[str, Any]:
    """Latency (ms) of 1-text requests sent every 1/per_second s (open loop: latency counts
    from the scheduled send time, so queueing behind slow requests is included): p50, p99 and
    max over the `seconds` after a `warmup` at the same rate, `slowest` (the three slowest, ms,
    with when they were sent, s into the window), and `first`, the first warm-up request,
    which meets a server that sat idle (see `_closed_loop` on idle memory).

    The HTTP clients are made and connected before the clock starts (making one costs more
    CPU than a request), and reused: one per sender thread."""
    import queue

    import httpx

    latencies: list[float] = []
    when: list[float] = []  # each measured request's send time, s into the window
    first: list[float] = []
    errors = [0]
    lock = threading.Lock()
    skip = int(per_second * warmup)
    n = skip + int(per_second * seconds)
    senders = min(64, max(4, int(per_second)))
    clients: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(senders):
        http = httpx.Client(timeout=60)
        http.get(f"{url}/livez")
        clients.put(http)
    start = time.perf_counter() + 0.2

    def send(i: int) -> None:
        scheduled = start + i / per_second
        time.sleep(max(0.0, scheduled - time.perf_counter()))
        http = clients.get()
        try:
            r = http.post(f"{url}/predict", json={"texts": [texts[i % len(texts)]]})
        finally:
            clients.put(http)
        ms = 1000 * (time.perf_counter() - scheduled)
        with lock:
            if r.status_code != 200:
                errors[0] += 1
            elif i == 0:
                first.append(ms)
            elif i >= skip:
                latencies.append(ms)
                when.append((i - skip) / per_second)

    with ThreadPoolExecutor(max_workers=senders) as pool:
        list(pool.map(send, range(n)))
    while not clients.empty():
        clients.get().close()
    q = statistics.quantiles(latencies, n=100)
    slowest = sorted(zip(latencies, when, strict=True), reverse=True)[:3]
    return {
        "p50": q[49],
        "p99": q[98],
        "max": max(latencies),
        "n": len(latencies),
        "first": first[0] if first else float("nan"),
        "errors": errors[0],
        # When the slowest were sent: together (one stall) or spread out (a slow tail).
        "slowest": slowest,
    }


def single_latency(urls: list[str], texts: list[str], n: int = 50) -> dict[str, float]:
    """Per url, the median latency (ms) of 1-text requests sent one after another: the time
    one request takes when nothing else is in flight. The urls take turns, request by
    request."""
    import httpx

    times: dict[str, list[float]] = {url: [] for url in urls}
    with httpx.Client(timeout=60) as http:
        for url in urls:
            http.post(f"{url}/predict", json={"texts": [texts[0]]})
        for i in range(n):
            for url in urls:
                start = time.perf_counter()
                http.post(f"{url}/predict", json={"texts": [texts[i % len(texts)]]})
                times[url].append(1000 * (time.perf_counter() - start))
    return {url: statistics.median(t) for url, t in times.items()}


# --------------------------------------------------------------------------- (e) features
def train_texts(data_dir: Path, limit: int) -> list[str]:
    """Training texts of every task under data_dir, interleaved, at most `limit`."""
    per_task = [
        [json.loads(line)["text"] for line in path.open()]
        for path in sorted(data_dir.glob("*/train.jsonl"))
    ]
    return [t for group in zip(*per_task, strict=False) for t in group][:limit]


def bench_features(encoder_dir: Path, texts: list[str], threads: int, max_length: int):
    """Texts/s of the four ways to compute pooled features of `texts`, each run once over
    all of them, in alternation (two rounds, the best of each)."""
    import torch

    from pipeline.features import OrtFeatureEncoder, encode_texts, load_tokenizer, tokenize
    from pipeline.model import load_encoder

    torch.set_num_threads(threads)
    encoder = load_encoder(str(encoder_dir)).eval()
    tokenizer = load_tokenizer(str(encoder_dir))
    onnx_path = scratch("bench-features-") / "encoder.onnx"
    ort_encoder = OrtFeatureEncoder(encoder, onnx_path, max_length, threads=threads, parallel=False)

    def fixed_batches() -> None:  # the feature cache before length buckets
        order = np.argsort([len(t) for t in texts], kind="stable")[::-1]
        with torch.inference_mode():
            for i in range(0, len(texts), 128):
                ids, mask = tokenize(tokenizer, [texts[j] for j in order[i : i + 128]], max_length)
                encoder(torch.from_numpy(ids), torch.from_numpy(mask))

    from pipeline.features import run_buckets
    from serving.runtime import RUN_MAX_TOKENS

    parallel = OrtFeatureEncoder(encoder, onnx_path, max_length, threads=threads, parallel=True)
    ways = {
        "PyTorch eager, fixed batches of 128 (first)": fixed_batches,
        "PyTorch eager, length buckets": lambda: encode_texts(
            encoder, tokenizer, texts, max_length
        ),
        "onnxruntime, length buckets, sequential": lambda: run_buckets(
            ort_encoder, tokenizer, texts, max_length, encoder.dim
        ),
        "onnxruntime, length buckets, data-parallel": lambda: run_buckets(
            parallel, tokenizer, texts, max_length, encoder.dim, workers=parallel.workers
        ),
        # the cache since session 13: buckets of at most RUN_MAX_TOKENS padded positions
        "onnxruntime, data-parallel, <= 512 positions (now)": lambda: run_buckets(
            parallel,
            tokenizer,
            texts,
            max_length,
            encoder.dim,
            workers=parallel.workers,
            max_tokens=RUN_MAX_TOKENS,
        ),
    }
    best = dict.fromkeys(ways, 0.0)
    for _ in range(2):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
    return best


def bench_token_states(
    encoder_dir: Path, texts: list[str], threads: int, max_length: int, n_layers: int
):
    """Texts/s of computing the fine-tuning cache's token states of the bottom `n_layers`
    blocks for `texts` (tokenization and the fp16 memmap writes included: what a first
    fine-tuning run does), with PyTorch eager and with onnxruntime (sequential and
    data-parallel), in alternation (two rounds, the best of each)."""
    import torch

    from pipeline.model import load_encoder
    from pipeline.token_cache import OrtStateProducer, TokenStateCache, TorchStateProducer

    torch.set_num_threads(threads)
    encoder = load_encoder(str(encoder_dir)).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-states-"))
    graph = work / "lower.onnx"
    producers = {
        "PyTorch eager": TorchStateProducer(encoder, n_layers),
        "onnxruntime, sequential": OrtStateProducer(
            encoder, n_layers, graph, max_length, threads=threads, parallel=False
        ),
        "onnxruntime, data-parallel": OrtStateProducer(
            encoder, n_layers, graph, max_length, threads=threads, parallel=True
        ),
    }
    best = dict.fromkeys(producers, 0.0)
    try:
        for round_ in range(2):
            for name, producer in producers.items():
                cache_dir = work / f"{round_}-{list(producers).index(name)}"
                cache = TokenStateCache(
                    cache_dir, str(encoder_dir), n_layers, max_length, producer=producer
                )
                start = time.perf_counter()
                cache.get(texts, desc=f"token states ({name})")
                best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
                shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return best


# --------------------------------------------------------------------------- scratch
_SCRATCH: list[Path] = []


def scratch(prefix: str) -> Path:
    """A new temporary directory, removed when `main` returns (a store with a registered
    model, an int8 graph or an exported artifact is 100+ MB; before this, every run left
    its directories in /tmp)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _SCRATCH.append(path)
    return path


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        while _SCRATCH:
            shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run",
        type=Path,
        nargs="?",
        default=REPO / "runs" / "latest",
        help="a finished run directory (default: runs/latest)",
    )
    parser.add_argument("--artifact", type=Path, help="its exported artifact (else exported)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/senteval")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--threads", type=int, help="ORT/torch threads (default: all CPUs)")
    parser.add_argument("--batch", type=int, default=32, help="(c) texts per request")
    parser.add_argument("--concurrency", type=int, default=4, help="(c) clients")
    parser.add_argument("--rate", type=float, default=10.0, help="(d) requests per second")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=30.0,
        help="(d) measured seconds per server: enough requests that p99 is not just the max",
    )
    parser.add_argument("--features", type=int, default=2000, help="(e) training texts (0: skip)")
    parser.add_argument(
        "--single",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="(a) a single-task artifact per task of the run",
    )
    args = parser.parse_args(argv)
    singles = {}
    for pair in args.single:
        task, sep, path = pair.partition("=")
        if not sep:
            raise SystemExit(f"--single {pair!r}: expected TASK=DIR")
        singles[task] = Path(path)
    if not (args.run / "run.json").is_file():
        raise SystemExit(
            f"{args.run}: not a finished run (no run.json); train one with `make train` or "
            "`polytask train configs/senteval6.yaml`, or name a run directory"
        )

    from tokenizers import Tokenizer

    from serving.artifact import ArtifactMetadata
    from serving.runtime import Runtime, ort_threads

    threads = args.threads or ort_threads()
    texts = dev_texts(args.data_dir)
    artifact = args.artifact
    if artifact is None and (args.run / "artifact" / "model.onnx").is_file():
        artifact = args.run / "artifact"
    if artifact is None:
        from pipeline.export import export_run

        out = scratch("bench-artifact-") / "artifact"
        artifact = export_run(args.run, register=False, output_dir=out).artifact_dir
    print(f"run {args.run.resolve()}, artifact {artifact}")
    print(f"{len(texts)} dev texts; {threads} threads; {args.seconds:g} s per measurement\n")

    encoder_dir = Path(ArtifactMetadata.read(artifact).encoder.name)
    if not (encoder_dir / "config.json").is_file():
        encoder_dir = Path(json.loads((args.run / "run.json").read_text())["encoder"]["path"])
    flops = FlopCounter(encoder_dir, Tokenizer.from_file(str(artifact / "tokenizer.json")))
    flops.extra_layers = own_blocks(args.run)  # routing.own: each own copy's blocks run too
    encoder_gflop = flops.mean_gflop(texts)
    head_gflop = heads_gflop(args.run)
    gflop = encoder_gflop + head_gflop  # what serving computes per text
    ceiling = matmul_ceiling(threads, flops.dim, flops.ffn)
    ceiling_texts = ceiling / gflop
    print(
        f"(0) ceiling: numpy sgemm {ceiling:.1f} GFLOP/s ({threads} threads); the encoder "
        f"({flops.layers} layers"
        + (f" + {flops.extra_layers} of own paths" if flops.extra_layers else "")
        + f", d={flops.dim}, d_ff={flops.ffn}) costs {encoder_gflop:.3f} "
        f"GFLOP per dev text on average and the served task heads {head_gflop:.4f}, so at most "
        f"{ceiling_texts:.0f} texts/s\n"
    )
    summary: list[tuple[str, float]] = []  # (path, texts/s) on the dev texts
    feature_rows: list[tuple[str, float, float]] = []  # (path, texts/s, GFLOP per text)

    def share(texts_per_s: float) -> str:
        return f"{100 * texts_per_s / ceiling_texts:.0f}% of ceiling"

    print("(b) texts/s, model only (tokenized inputs, batches as they come), all tasks")
    print(
        f"{'batch':>5} {'torch':>8} {'ort fp32':>9} {'ort int8':>9} {'fp32/torch':>11} "
        f"{'int8/torch':>11} {'fp32 share':>11}"
    )
    for batch, r in bench_engines(args.run, artifact, texts, threads, args.seconds):
        print(
            f"{batch:>5} {r['torch']:>8.1f} {r['fp32']:>9.1f} {r['int8']:>9.1f} "
            f"{r['fp32'] / r['torch']:>10.2f}x {r['int8'] / r['torch']:>10.2f}x "
            f"{100 * r['fp32'] / ceiling_texts:>10.0f}%"
        )
        summary += [
            (f"PyTorch eager, batch {batch} (model only)", r["torch"]),
            (f"raw ORT fp32, batch {batch} (model only)", r["fp32"]),
            (f"raw ORT int8, batch {batch} (model only)", r["int8"]),
        ]

    # parallel=True: the data-parallel path whatever the environment says; each call picks
    # it (None) or the sequential path (False), so one runtime measures both.
    runtime = Runtime(artifact, threads=threads, parallel=True)
    b = args.batch
    modes = {"sequential": False, "data-parallel": None}  # Runtime.run's `parallel`
    if runtime.workers < 2:
        print(f"note: {threads} thread(s): data-parallel is the sequential path here")

    def as_they_come(parallel: bool | None):
        i = [0]

        def step() -> None:
            runtime.run([texts[(i[0] + j) % len(texts)] for j in range(b)], parallel=parallel)
            i[0] += b

        return step

    def raw_rates() -> dict[str, float]:
        steps = {mode: as_they_come(p) for mode, p in modes.items()}
        return interleaved_rates(steps, b, 2 * args.seconds)

    by_length = sorted(texts, key=len)

    def sorted_rates(rounds: int = 2) -> dict[str, float]:
        best = dict.fromkeys(modes, 0.0)
        for _ in range(rounds):
            for mode, parallel in modes.items():
                start = time.perf_counter()
                for i in range(0, len(by_length), b):
                    runtime.run(by_length[i : i + b], parallel=parallel)
                best[mode] = max(best[mode], len(by_length) / (time.perf_counter() - start))
        return best

    from serving.runtime import PARALLEL_ENV

    raw_before = raw_rates()
    envs = {"sequential": {PARALLEL_ENV: "0"}, "data-parallel": {PARALLEL_ENV: "1"}}
    served = dict.fromkeys(modes, 0.0)
    errors = dict.fromkeys(modes, 0)
    latency: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        servers = {m: stack.enter_context(Server(artifact, threads, envs[m])) for m in modes}
        rounds = 2
        many = 4 * args.concurrency  # more clients: does the throughput still grow?
        served_many, errors_many = 0.0, 0
        for _ in range(rounds):  # alternating slices: load from elsewhere hits both alike
            for mode, server in servers.items():
                texts_s, failed = saturate(
                    server.url, texts, b, args.concurrency, args.seconds / rounds
                )
                served[mode] += texts_s / rounds
                errors[mode] += failed
            texts_s, failed = saturate(
                servers["data-parallel"].url, texts, b, many, args.seconds / rounds
            )
            served_many += texts_s / rounds
            errors_many += failed
        alone = single_latency([s.url for s in servers.values()], texts)
        for mode, server in servers.items():
            latency[mode] = fixed_rate(server.url, texts, args.rate, args.latency_seconds)
    raw_after = raw_rates()
    raw = {m: (raw_before[m] + raw_after[m]) / 2 for m in modes}
    sorted_raw = sorted_rates()
    print(f"\n(c) texts/s, tokenization included, {b} texts per call")
    for mode in modes:
        print(
            f"{mode:>13}: raw ORT session, texts as they come: {raw[mode]:.1f} (before "
            f"{raw_before[mode]:.1f}, after {raw_after[mode]:.1f}), {share(raw[mode])}; "
            f"all texts sorted by length: {sorted_raw[mode]:.1f}, {share(sorted_raw[mode])}"
        )
        print(
            f"{mode:>13}: /predict at saturation ({args.concurrency} clients): "
            f"{served[mode]:.1f}, {errors[mode]} failed requests, {share(served[mode])}; "
            f"/predict / raw ORT: {served[mode] / raw[mode]:.2f}"
        )
    print(
        f"data-parallel: /predict with {many} clients: {served_many:.1f}, {errors_many} failed "
        f"requests, {share(served_many)}; / {args.concurrency} clients: "
        f"{served_many / served['data-parallel']:.2f}"
    )
    ratios = [m["data-parallel"] / m["sequential"] for m in (raw, sorted_raw, served)]
    print(
        "data-parallel / sequential: raw as they come {:.2f}x, sorted {:.2f}x, "
        "/predict {:.2f}x".format(*ratios)
    )
    print(
        f"\n(d) 1-text requests at {args.rate:g}/s for {args.latency_seconds:g} s after "
        f"{WARMUP_S:g} s at the same rate"
    )
    for mode in modes:
        lat = latency[mode]
        print(
            f"{mode:>13}: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms (p99/p50 "
            f"{lat['p99'] / lat['p50']:.2f}), max {lat['max']:.1f} ms, {lat['n']:.0f} requests, "
            f"{lat['errors']:.0f} failed; one request alone (sequential, median): "
            f"{alone[servers[mode].url]:.1f} ms; first request after the server sat idle: "
            f"{lat['first']:.1f} ms; slowest three: "
            + ", ".join(f"{ms:.0f} ms sent at {at:.1f} s" for ms, at in lat["slowest"])
        )
    for mode in modes:
        summary += [
            (f"raw ORT session, {b} texts per call as they come, {mode}", raw[mode]),
            (f"raw ORT session, sorted by length, batches of {b}, {mode}", sorted_raw[mode]),
            (
                f"POST /predict, {args.concurrency} clients x {b} texts, {mode}",
                served[mode],
            ),
        ]
    summary.append((f"POST /predict, {many} clients x {b} texts, data-parallel", served_many))
    if singles:
        multi, multi_err, split, split_err = bench_split(artifact, singles, texts, threads, args)
        print(
            f"\n(a) texts/s with every task's answer, {args.concurrency} clients, "
            f"{b} texts per request"
        )
        print(f"six-task endpoint: {multi:.1f} ({multi_err} failed requests)")
        print(
            f"{len(singles)} single-task services ({max(1, threads // len(singles))} ORT "
            f"thread(s) each): {split:.1f} ({split_err} failed requests)"
        )
        print(f"ratio: {multi / split:.2f}x")
    else:
        print("\n(a) six-task endpoint vs single-task services: skipped (no --single)")

    if args.features:
        sample = train_texts(args.data_dir, args.features)
        sample_gflop = flops.mean_gflop(sample)
        max_length = ArtifactMetadata.read(artifact).encoder.max_length
        print(
            f"\n(e) feature extraction, {len(sample)} training texts ({sample_gflop:.3f} GFLOP "
            f"per text: at most {ceiling / sample_gflop:.0f} texts/s), texts/s"
        )
        for name, value in bench_features(encoder_dir, sample, threads, max_length).items():
            print(f"{name}: {value:.1f}, {100 * value * sample_gflop / ceiling:.0f}% of ceiling")
            feature_rows.append((f"features: {name}", value, sample_gflop))
        # The fine-tuning cache runs the bottom layers only: their share of the text's FLOPs.
        n_cached = max(flops.layers - 2, 1)
        states_gflop = sample_gflop * n_cached / flops.layers
        print(
            f"\n(e') fine-tuning token states of layers 1-{n_cached} of {flops.layers}, same "
            f"texts ({states_gflop:.3f} GFLOP per text), texts/s"
        )
        states = bench_token_states(encoder_dir, sample, threads, max_length, n_cached)
        for name, value in states.items():
            print(f"{name}: {value:.1f}, {100 * value * states_gflop / ceiling:.0f}% of ceiling")
            feature_rows.append((f"token states: {name}", value, states_gflop))

    print(f"\nshare of the machine's fp32 ceiling ({ceiling_texts:.0f} texts/s, this run):")
    print(f"{'path':<64} {'texts/s':>8} {'GFLOP/s':>8} {'share':>6}")
    rows = [(name, value, gflop) for name, value in summary] + feature_rows
    for name, value, per_text in rows:
        print(
            f"{name:<64} {value:>8.1f} {value * per_text:>8.1f} "
            f"{100 * value * per_text / ceiling:>5.0f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
