"""The token-state cache of partial fine-tuning: the bottom layers' output, computed once.

With `encoder.trainable_layers: N` (0 < N < number of layers) the bottom blocks and the
embeddings never train, so their output for a text never changes. It is computed once per text
and stored on disk; every later epoch, run and experiment reads it, and training runs only the
top N blocks, pooling and the heads.

One cache entry holds the token states of one list of texts (`get`); `get_many` computes
several lists in one pass over their distinct texts (senteval6's splits share 19% of their
texts) and still writes one entry per list:

    <cache>/token_states/<key>/<texts sha256>/states.npy   fp16 [T, d]: every text's real
                                                            tokens (no padding), concatenated
                                                            in length order, longest first
    <cache>/token_states/<key>/<texts sha256>/index.npz    offsets, lengths: int64 [n], by row

Row i's states are `states[offsets[i] : offsets[i] + lengths[i]]`. The key hashes the encoder
fingerprint, the number of cached layers and `max_length`, so changing any of them never reuses
stale states. Length order keeps the rows of a length-bucketed batch close together on disk.
Entries are memory-mapped: the workers on one machine share one copy in the page cache instead
of each holding the whole cache. An entry is written under a temporary name and renamed, so a
crash never leaves a truncated one.

What computes the states is a `StateProducer`; `TorchStateProducer` runs the PyTorch encoder
(eager), `OrtStateProducer` the same layers exported to onnxruntime. One can replace the other
without changing the cache, since the producer is not part of the key: two producers must agree
to well within fp16 precision. By default the cache runs onnxruntime (the lower layers
exported once per key under `<cache>/onnx/`, checked against PyTorch on padded and unpadded
batches before use; PyTorch eager when the export fails or differs); `engine="torch"` runs
PyTorch eager.
States are computed in length buckets (`serving.runtime.plan_buckets`, longest first), and a
producer with `workers` > 1 gets that many buckets at once (`parallel_map`): onnxruntime's
producer runs them data-parallel, one single-threaded call per core, in buckets of at most
RUN_MAX_TOKENS padded positions ($POLYTASK_ORT_PARALLEL=0: one call at a time on all cores).
Why onnxruntime by default (since session 13; PyTorch before): data-parallel it computed these
states 1.12x as fast as PyTorch on session 5's idle machine (sgemm 318-363 GFLOP/s) and 1.56x
on session 13's (AVX2 only, 156 GFLOP/s; `bench/serve.py` (e'): 47% of the fp32 ceiling for
PyTorch there, 73% for onnxruntime), and its first use now costs seconds, not the 19 s of the
dynamo export that made PyTorch the default (the TorchScript exporter: 1.6 s for layers 1-3;
docs/results.md, Run 17).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.data import texts_fingerprint
from pipeline.features import TextProgress, encoder_fingerprint, load_tokenizer, parallel_map
from serving.runtime import RUN_MAX_TOKENS, plan_buckets

logger = logging.getLogger(__name__)

STATES_FILE = "states.npy"
INDEX_FILE = "index.npz"
FORMAT_VERSION = 1
# Largest |onnxruntime - PyTorch| over real tokens for onnxruntime to compute the states. They
# are stored in fp16, whose rounding is ~5e-4 of a value (states are of order 1-10): 1e-3 keeps
# the producer's own error below what storage already adds.
ORT_STATE_TOLERANCE = 1e-3


class StateProducer(Protocol):
    """Computes the token states entering the first trained block, for one padded batch.

    `workers`: how many calls the cache may make at once from different threads (1: one at a
    time)."""

    dim: int
    workers: int

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, L] x 2 -> float [B, L, d] (padding positions are ignored)."""
        ...


class TorchStateProducer:
    """The embeddings and the bottom `n_layers` blocks of an encoder (pipeline.model.Encoder),
    in PyTorch eager mode."""

    def __init__(self, encoder: Any, n_layers: int, device: str = "cpu"):
        self.encoder = encoder.eval().to(device)
        self.n_layers = n_layers
        self.device = device
        self.dim = int(encoder.dim)
        self.workers = 1

    @classmethod
    def from_path(cls, encoder_path: str, n_layers: int, device: str = "cpu") -> TorchStateProducer:
        from pipeline.model import load_encoder

        return cls(load_encoder(encoder_path), n_layers, device)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            states = self.encoder.lower_states(ids, mask, self.n_layers)
        return states.float().cpu().numpy()


class OrtStateProducer:
    """The same states as `TorchStateProducer`, from onnxruntime: the embeddings and the
    bottom `n_layers` blocks exported once (TorchScript exporter, see pipeline/onnx_graph.py)
    to `path`, reused by later runs, and checked against PyTorch at load (`max_abs_diff`).

    Args:
        encoder: A pipeline.model.Encoder with the pretrained (frozen) lower layers.
        n_layers: Blocks whose output is cached.
        path: Where the graph is (or will be) stored, e.g. next to the cache entries.
        max_length: The longest sequence the graph must take.
        threads: The cores to use; default `serving.runtime.ort_threads()`.
        parallel: Whether they are used data-parallel: `workers` = `threads` concurrent calls
            on a session with one intra-op thread, rather than one call at a time with
            `threads` intra-op threads; default `serving.runtime.ort_parallel()`.
    """

    def __init__(
        self,
        encoder: Any,
        n_layers: int,
        path: Path,
        max_length: int,
        threads: int | None = None,
        parallel: bool | None = None,
    ):
        from serving.runtime import cpu_session

        self.encoder = encoder.eval()
        self.n_layers = n_layers
        self.dim = int(encoder.dim)
        self.path = Path(path)
        if not self.path.is_file():
            _export_lower(encoder, n_layers, self.path, max_length)
        self.session, self.workers = cpu_session(self.path, threads, parallel)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, L] x 2 -> float32 [B, L, d]."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.session.run(None, feeds)[0]

    def max_abs_diff(self, vocab_size: int, pad_id: int, max_length: int) -> float:
        """Largest |onnxruntime - PyTorch| over the real tokens of padded and unpadded random
        batches of several shapes (the export parity cases)."""
        from pipeline.export import parity_inputs

        torch_producer = TorchStateProducer(self.encoder, self.n_layers)
        worst, seed = 0.0, 0
        for batch in (1, 3, 8):
            for seq in sorted({min(5, max_length), max(max_length // 2, 2), max_length}):
                for padded in (False, True):
                    seed += 1
                    ids, mask = parity_inputs(batch, seq, padded, vocab_size, pad_id, seed)
                    real = mask.astype(bool)
                    diff = np.abs(self(ids, mask)[real] - torch_producer(ids, mask)[real]).max()
                    worst = max(worst, float(diff) if not np.isnan(diff) else float("inf"))
        return worst


def _export_lower(encoder: Any, n_layers: int, path: Path, max_length: int) -> None:
    import torch

    from pipeline.onnx_graph import export_graph

    class Lower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):  # int64 [B, L] x 2 -> [B, L, d]
            return self.encoder.lower_states(input_ids, attention_mask, n_layers)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
    start = time.monotonic()
    exporter = export_graph(Lower(), tmp, ["states"], max_length, output_seq_dim=True)
    tmp.replace(path)
    logger.info(
        "token states: lower-layer graph exported (%s) in %.0fs", exporter, time.monotonic() - start
    )


@dataclass(frozen=True)
class TokenStates:
    """One memory-mapped cache entry (see the module docstring)."""

    path: Path
    states: np.ndarray  # fp16 [T, d], memory-mapped
    offsets: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]

    @classmethod
    def open(cls, path: str | Path) -> TokenStates:
        path = Path(path)
        index = np.load(path / INDEX_FILE)
        states = np.load(path / STATES_FILE, mmap_mode="r")
        return cls(path, states, index["offsets"], index["lengths"])

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def dim(self) -> int:
        return int(self.states.shape[1])

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows padded to the longest of them: float32 states [B, L, d], int64 mask [B, L]."""
        lengths = self.lengths[rows]
        width = max(int(lengths.max()), 1) if len(rows) else 1
        out = np.zeros((len(rows), width, self.dim), dtype=np.float32)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            start = int(self.offsets[row])
            out[i, :n] = self.states[start : start + n]
            mask[i, :n] = 1
        return out, mask


class TokenStateCache:
    """Token states of the bottom `n_layers` blocks on disk, computed on first use."""

    def __init__(
        self,
        cache_dir: Path,
        encoder_path: str,
        n_layers: int,
        max_length: int,
        batch_size: int = 128,
        producer: StateProducer | None = None,
        engine: Literal["onnxruntime", "torch"] = "onnxruntime",
        encoder: Any = None,
    ):
        """`producer` computes the states when given; otherwise the cache builds one on the
        first miss from `encoder` (a pipeline.model.Encoder, else loaded from `encoder_path`):
        onnxruntime when `engine` says so and its graph matches PyTorch within
        ORT_STATE_TOLERANCE, else PyTorch eager."""
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        key = json.dumps(
            {
                "encoder": encoder_fingerprint(encoder_path),
                "layers": n_layers,
                "max_length": max_length,
                "format": FORMAT_VERSION,
                "special_tokens": "as text",  # as in FeatureCache (pipeline/features.py)
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / "token_states" / digest
        self.onnx_path = Path(cache_dir) / "onnx" / f"token-states-{digest}" / "lower.onnx"
        self.encoder_path = encoder_path
        self.n_layers = n_layers
        self.max_length = max_length
        self.batch_size = batch_size
        self._producer = producer
        self.engine = engine
        self._encoder = encoder
        self._tokenizer = None
        self.computed = 0  # texts whose states this object computed (the rest came from disk)

    def path_for(self, texts: list[str]) -> Path:
        return self.dir / texts_fingerprint(texts)

    def has(self, texts: list[str]) -> bool:
        path = self.path_for(texts)
        if not (path / INDEX_FILE).is_file() or not (path / STATES_FILE).is_file():
            return False
        with np.load(path / INDEX_FILE) as index:
            return index["lengths"].shape[0] == len(texts)

    def get(self, texts: list[str], desc: str = "token states") -> TokenStates:
        """The entry of `texts`, computed and stored on the first call."""
        return self.get_many([(texts, desc)])[0]

    def get_many(self, requests: list[tuple[list[str], str]]) -> list[TokenStates]:
        """The entries of several text lists (texts, description), one per list: those in the
        cache are opened, the others computed in one pass over their distinct texts and stored
        per list (as `FeatureCache.get_many`: senteval6's splits hold 44,774 texts, 36,076
        distinct, since MR, SST-2 and SUBJ share sentences)."""
        out: list[TokenStates | None] = [None] * len(requests)
        missing: list[int] = []
        for k, (texts, desc) in enumerate(requests):
            path = self.path_for(texts)
            if self.has(texts):
                logger.info(
                    "%s: %d texts, cached states of layers 1-%d from %s (lower layers not run)",
                    desc,
                    len(texts),
                    self.n_layers,
                    path,
                )
                out[k] = TokenStates.open(path)
            else:
                missing.append(k)
        if len(missing) == 1:
            texts, desc = requests[missing[0]]
            self._compute(texts, self.path_for(texts), desc)
        elif missing:
            rows: dict[str, int] = {}  # distinct texts in first-seen order -> row in `distinct`
            for k in missing:
                for text in requests[k][0]:
                    rows.setdefault(text, len(rows))
            total = sum(len(requests[k][0]) for k in missing)
            desc = f"token states ({len(missing)} splits, {len(rows)} distinct of {total} texts)"
            # The distinct texts' states go to a private entry, copied into each list's entry,
            # then removed: the cache only ever holds entries of the lists asked for.
            scratch = self.dir / f"distinct.{os.getpid()}"
            shutil.rmtree(scratch, ignore_errors=True)  # left by a crashed run with our pid
            try:
                self._compute(list(rows), scratch, desc)
                started = time.monotonic()
                distinct = TokenStates.open(scratch)
                for k in missing:
                    texts = requests[k][0]
                    index = np.fromiter((rows[t] for t in texts), np.int64, len(texts))
                    self._write_subset(distinct, index, self.path_for(texts))
                del distinct
                logger.info(
                    "token states: the %d splits' entries written from the one pass in %.1fs",
                    len(missing),
                    time.monotonic() - started,
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        for k in missing:
            out[k] = TokenStates.open(self.path_for(requests[k][0]))
        assert all(e is not None for e in out)  # each list was opened or computed above
        return out  # type: ignore[return-value]

    def _write_subset(self, source: TokenStates, index: np.ndarray, path: Path) -> None:
        """Write the entry whose row i is `source`'s row index[i], in the same layout as
        `_compute` (rows in length order, longest first), under a temporary name."""
        lengths = source.lengths[index]
        order = np.argsort(-lengths, kind="stable")
        offsets = np.zeros(len(index), dtype=np.int64)
        if len(index):
            offsets[order] = np.concatenate([[0], np.cumsum(lengths[order])[:-1]])
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        states = np.lib.format.open_memmap(
            tmp / STATES_FILE,
            mode="w+",
            dtype=np.float16,
            shape=(int(lengths.sum()), source.dim),
        )
        # In length order, the destination front to back, a few thousand rows per gather: each
        # chunk's rows are contiguous there, and their tokens are gathered from `source` at once.
        for c in range(0, len(order), 4096):
            rows = order[c : c + 4096]
            n = lengths[rows]
            total = int(n.sum())
            within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)  # token's place in its row
            tokens = np.repeat(source.offsets[index[rows]], n) + within
            first = int(offsets[rows[0]])
            states[first : first + total] = source.states[tokens]
        states.flush()
        del states
        np.savez(tmp / INDEX_FILE, offsets=offsets, lengths=lengths)
        self._publish(tmp, path)

    def _producer_or_default(self) -> StateProducer:
        if self._producer is not None:
            return self._producer
        if self._encoder is None:
            from pipeline.model import load_encoder

            self._encoder = load_encoder(self.encoder_path)
        encoder = self._encoder.eval()
        self._producer = TorchStateProducer(encoder, self.n_layers)
        if self.engine != "onnxruntime":
            return self._producer
        try:
            ort_producer = OrtStateProducer(encoder, self.n_layers, self.onnx_path, self.max_length)
            tokenizer = self._tokenizer or load_tokenizer(self.encoder_path)
            diff = ort_producer.max_abs_diff(
                int(encoder.transformer.config.vocab_size),
                int(tokenizer.pad_token_id or 0),
                self.max_length,
            )
        except Exception as err:  # the exporter and onnxruntime raise many types
            logger.warning(
                "token states: onnxruntime unavailable (%s: %s); using PyTorch",
                type(err).__name__,
                err,
            )
            return self._producer
        if diff <= ORT_STATE_TOLERANCE:
            logger.info("token states: onnxruntime (max abs diff to PyTorch %.1e)", diff)
            self._producer = ort_producer
        else:
            logger.warning(
                "token states: onnxruntime differs from PyTorch by %.3g > %.0e; using PyTorch",
                diff,
                ORT_STATE_TOLERANCE,
            )
        return self._producer

    def _compute(self, texts: list[str], path: Path, desc: str) -> None:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.encoder_path)
        producer = self._producer_or_default()
        tokenizer = self._tokenizer
        n = len(texts)
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: memory peak shows early
        offsets = np.zeros(n, dtype=np.int64)
        offsets[order] = np.concatenate([[0], np.cumsum(lengths[order])[:-1]]) if n else []
        total = int(lengths.sum())

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        states = np.lib.format.open_memmap(
            tmp / STATES_FILE, mode="w+", dtype=np.float16, shape=(total, producer.dim)
        )
        logger.info(
            "%s: computing layers 1-%d for %d texts (%d tokens), cached in %s",
            desc,
            self.n_layers,
            n,
            total,
            path,
        )
        progress = TextProgress(desc, n, work=total)

        # Length buckets (`plan_buckets`, as the feature cache and the service split), longest
        # first, at least one per worker so that a short list still uses every core; for
        # single-threaded calls side by side also at most RUN_MAX_TOKENS padded positions, as
        # the feature cache (pipeline/features.py).
        size = min(self.batch_size, max(1, -(-n // producer.workers)))
        ascending = np.argsort(lengths, kind="stable")
        max_tokens = RUN_MAX_TOKENS if producer.workers > 1 else None
        buckets = plan_buckets(lengths[ascending], max_size=size, max_tokens=max_tokens)

        def batches():
            for start, end in reversed(buckets):
                rows = ascending[start:end][::-1]
                width = int(lengths[rows].max())
                batch_ids = np.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for j, row in enumerate(rows):
                    batch_ids[j, : lengths[row]] = ids[row]
                    mask[j, : lengths[row]] = 1
                yield rows, batch_ids, mask

        # `producer.workers` batches computed at once; written here, in order, meanwhile.
        computed = parallel_map(lambda b: producer(b[1], b[2]), batches(), producer.workers)
        for (rows, _, _), out in computed:
            for j, row in enumerate(rows):
                states[offsets[row] : offsets[row] + lengths[row]] = out[j, : lengths[row]]
            self.computed += len(rows)
            progress.add(len(rows), int(lengths[rows].sum()))
        states.flush()
        del states
        np.savez(tmp / INDEX_FILE, offsets=offsets, lengths=lengths)
        self._publish(tmp, path)

    def _publish(self, tmp: Path, path: Path) -> None:
        """Rename a finished entry into place: atomic, so a crash never leaves a truncated one;
        a concurrent run may have written the same entry first, and then ours is dropped."""
        try:
            tmp.rename(path)
        except OSError:
            if not ((path / INDEX_FILE).is_file() and (path / STATES_FILE).is_file()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
