"""Feature extraction on onnxruntime, in length buckets: the features equal PyTorch eager's
within the export parity tolerance (padded and unpadded, short and long texts mixed), buckets
pad far less than sorted fixed-size batches, the exported graph is reused, and a failing
export falls back to PyTorch. On the tiny random BERT of conftest."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.features import ORT_FEATURE_TOLERANCE

MAX_LENGTH = 16


def _texts() -> list[str]:
    short = ["good", "bad film", "pizza", "the coach", "awful", "nice", "dull soup", "team"]
    long = [" ".join(["good great film with the team"] * 3) + f" match {i}" for i in range(8)]
    return [t for pair in zip(short, long, strict=True) for t in pair] * 3


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    from pipeline.model import load_encoder

    return load_encoder(str(tiny_encoder_dir)).eval()


def test_ort_features_equal_pytorch(tiny_encoder_dir, encoder, tmp_path):
    from pipeline.features import FeatureCache, OrtFeatureEncoder, encode_texts, load_tokenizer

    texts = _texts()
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    eager = encode_texts(encoder, tokenizer, texts, MAX_LENGTH, batch_size=4)
    cache = FeatureCache(tmp_path, str(tiny_encoder_dir), MAX_LENGTH, "mean")
    feats = cache.get(texts, batch_size=4)
    assert isinstance(cache._runner(), OrtFeatureEncoder)
    assert cache.onnx_path.is_file()
    assert np.abs(feats - eager).max() <= ORT_FEATURE_TOLERANCE
    # Each text alone (no padding at all) gives the same features.
    alone = np.concatenate([encode_texts(encoder, tokenizer, [t], MAX_LENGTH) for t in texts[:4]])
    assert np.abs(feats[:4] - alone).max() <= ORT_FEATURE_TOLERANCE
    # A later cache for the same encoder reuses the exported graph (not written again).
    mtime = cache.onnx_path.stat().st_mtime_ns
    again = FeatureCache(tmp_path, str(tiny_encoder_dir), MAX_LENGTH, "mean")
    again.get(texts[:5], batch_size=4)
    assert again.onnx_path == cache.onnx_path and cache.onnx_path.stat().st_mtime_ns == mtime


def test_length_buckets_pad_less_than_sorted_batches(tiny_encoder_dir):
    from pipeline.features import length_buckets, load_tokenizer

    texts = _texts()
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    buckets = list(length_buckets(tokenizer, texts, MAX_LENGTH, max_size=16))
    assert sorted(np.concatenate([idx for idx, _, _ in buckets]).tolist()) == list(
        range(len(texts))
    )
    real = sum(int(mask.sum()) for _, _, mask in buckets)
    padded = sum(mask.size for _, _, mask in buckets) - real
    # Fixed batches of 16 in length order: each padded to its longest text.
    lengths = np.sort([len(x) for x in tokenizer(texts, truncation=True, max_length=16).input_ids])
    fixed = sum(len(c) * c.max() - c.sum() for c in np.split(lengths, range(16, len(lengths), 16)))
    assert padded < fixed / 4
    for idx, ids, mask in buckets:  # the rows are the texts' own tokens
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=MAX_LENGTH)
        for row, want in enumerate(enc.input_ids):
            assert ids[row, : len(want)].tolist() == want and mask[row].sum() == len(want)


def test_length_buckets_bound_padded_positions(tiny_encoder_dir):
    """`max_tokens` caps a bucket's padded positions (texts x its longest), every text still
    in exactly one bucket; without it only `max_size` bounds a bucket."""
    from pipeline.features import length_buckets, load_tokenizer

    texts = _texts()
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    bounded = list(length_buckets(tokenizer, texts, MAX_LENGTH, max_size=64, max_tokens=40))
    free = list(length_buckets(tokenizer, texts, MAX_LENGTH, max_size=64))
    assert all(ids.size <= 40 for _, ids, _ in bounded)
    assert max(ids.size for _, ids, _ in free) > 40
    for buckets in (bounded, free):
        rows = np.concatenate([idx for idx, _, _ in buckets])
        assert sorted(rows.tolist()) == list(range(len(texts)))


def test_get_many_encodes_shared_texts_once(tiny_encoder_dir, tmp_path, monkeypatch):
    """Several lists in one pass: each distinct text is encoded once, each list gets its own
    rows in its own order (equal to encoding it alone) and its own cache entry, and cached
    lists are loaded, not computed again."""
    from pipeline.features import FeatureCache

    texts = _texts()
    a, b = texts[:20], texts[10:] + texts[:3]  # 13 texts in both, and duplicates within b
    alone = FeatureCache(tmp_path / "alone", str(tiny_encoder_dir), MAX_LENGTH, "mean")
    want_a, want_b = alone.get(a, batch_size=4), alone.get(b, batch_size=4)

    cache = FeatureCache(tmp_path / "many", str(tiny_encoder_dir), MAX_LENGTH, "mean")
    cache.get(a, batch_size=4)  # `a` cached before
    seen: list[int] = []
    run = cache._runner()

    def counting(ids, mask):
        seen.append(len(ids))
        return run(ids, mask)

    monkeypatch.setattr(cache, "_run", counting)
    c = ["a text only c has", *b[:4]]
    got_a, got_b, got_c = cache.get_many([(a, "a"), (b, "b"), (c, "c")], batch_size=4)
    assert sum(seen) == len(set(b) | set(c))  # `a` loaded; b and c's shared texts once
    assert got_a.shape == want_a.shape and np.abs(got_a - want_a).max() <= ORT_FEATURE_TOLERANCE
    assert np.abs(got_b - want_b).max() <= ORT_FEATURE_TOLERANCE
    np.testing.assert_array_equal(got_c[1:], got_b[:4])
    for texts_, got in ((b, got_b), (c, got_c)):
        assert cache.path_for(texts_).is_file()
        np.testing.assert_array_equal(np.load(cache.path_for(texts_)), got)
    seen.clear()
    again = cache.get_many([(b, "b"), (c, "c")])
    assert seen == [] and all(
        np.array_equal(x, y) for x, y in zip(again, (got_b, got_c), strict=True)
    )


def test_failed_export_falls_back_to_pytorch(
    tiny_encoder_dir, encoder, tmp_path, monkeypatch, caplog
):
    import pipeline.features as features

    def broken(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(features, "export_encoder", broken)
    cache = features.FeatureCache(tmp_path, str(tiny_encoder_dir), MAX_LENGTH, "mean")
    with caplog.at_level(logging.WARNING, logger="pipeline.features"):
        feats = cache.get(_texts()[:6])
    assert "using PyTorch" in caplog.text
    tokenizer = features.load_tokenizer(str(tiny_encoder_dir))
    eager = features.encode_texts(encoder, tokenizer, _texts()[:6], MAX_LENGTH)
    np.testing.assert_allclose(feats, eager, atol=1e-6)


def test_ort_state_producer_equals_pytorch_and_fills_the_same_cache(
    tiny_encoder_dir, encoder, tmp_path
):
    """The token-state cache's onnxruntime producer: the bottom layer's states equal
    PyTorch's on the parity shapes (real tokens), and a cache entry computed with it matches
    one computed with PyTorch within fp16 precision."""
    from pipeline.token_cache import OrtStateProducer, TokenStateCache, TorchStateProducer

    producer = OrtStateProducer(encoder, 1, tmp_path / "lower.onnx", MAX_LENGTH)
    vocab = int(encoder.transformer.config.vocab_size)
    assert producer.max_abs_diff(vocab, 0, MAX_LENGTH) <= ORT_FEATURE_TOLERANCE
    texts = _texts()
    caches = {
        name: TokenStateCache(tmp_path / name, str(tiny_encoder_dir), 1, MAX_LENGTH, 8, p)
        for name, p in (("ort", producer), ("torch", TorchStateProducer(encoder, 1)))
    }
    ort_states, torch_states = (caches[n].get(texts) for n in ("ort", "torch"))
    assert (ort_states.lengths == torch_states.lengths).all()
    diff = np.abs(ort_states.states.astype(np.float32) - torch_states.states.astype(np.float32))
    assert diff.max() <= 1e-2  # fp16 storage: a few ulps of values of order 1


def test_token_state_cache_engines_and_fallback(
    tiny_encoder_dir, encoder, tmp_path, monkeypatch, caplog
):
    """The cache builds its own producer from the encoder: onnxruntime by default when it
    matches PyTorch (the graph stored once under <cache>/onnx/), PyTorch when it differs by
    more than the tolerance or with engine="torch"; every way fills an entry with the same
    states within fp16 precision."""
    import pipeline.token_cache as token_cache

    texts = _texts()
    eager = token_cache.TokenStateCache(
        tmp_path / "d", str(tiny_encoder_dir), 1, MAX_LENGTH, 8, engine="torch", encoder=encoder
    )
    eager_states = eager.get(texts)
    assert isinstance(eager._producer, token_cache.TorchStateProducer)
    assert not eager.onnx_path.exists()
    ort_cache = token_cache.TokenStateCache(
        tmp_path / "a", str(tiny_encoder_dir), 1, MAX_LENGTH, 8, encoder=encoder
    )
    ort_states = ort_cache.get(texts)
    assert isinstance(ort_cache._producer, token_cache.OrtStateProducer)
    assert ort_cache.onnx_path.is_file() and ort_cache.onnx_path.is_relative_to(tmp_path / "a")

    monkeypatch.setattr(token_cache, "ORT_STATE_TOLERANCE", -1.0)  # nothing can match
    torch_cache = token_cache.TokenStateCache(
        tmp_path / "b",
        str(tiny_encoder_dir),
        1,
        MAX_LENGTH,
        8,
        engine="onnxruntime",
        encoder=encoder,
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.token_cache"):
        torch_states = torch_cache.get(texts)
    assert isinstance(torch_cache._producer, token_cache.TorchStateProducer)
    assert "using PyTorch" in caplog.text
    diff = np.abs(ort_states.states.astype(np.float32) - torch_states.states.astype(np.float32))
    assert (ort_states.lengths == torch_states.lengths).all() and diff.max() <= 1e-2
    assert np.array_equal(eager_states.states, torch_states.states)  # both PyTorch


def test_graphs_are_traced_with_torchscript_and_fall_back_to_dynamo(
    encoder, tmp_path, monkeypatch, caplog
):
    """The training caches' graphs come from the TorchScript exporter (fast to export); when
    it fails, the dynamo exporter writes them; either graph answers as PyTorch does on shapes
    other than the traced example."""
    import onnxruntime as ort
    import torch

    import pipeline.onnx_graph as onnx_graph

    def check(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        vocab = int(encoder.transformer.config.vocab_size)
        ids = np.arange(5 * 13).reshape(5, 13) % (vocab - 5) + 5
        mask = np.ones_like(ids)
        mask[2:, 9:] = 0
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        with torch.inference_mode():
            want = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        assert np.abs(got - want).max() <= ORT_FEATURE_TOLERANCE

    assert onnx_graph.export_graph(encoder, tmp_path / "a.onnx", ["f"], MAX_LENGTH) == "torchscript"
    check(tmp_path / "a.onnx")

    def broken(*args, **kwargs):
        raise RuntimeError("tracer broke")

    monkeypatch.setattr(onnx_graph, "torchscript_export", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.onnx_graph"):
        assert onnx_graph.export_graph(encoder, tmp_path / "b.onnx", ["f"], MAX_LENGTH) == "dynamo"
    assert "using the dynamo exporter" in caplog.text
    check(tmp_path / "b.onnx")


def test_progress_eta_follows_tokens_not_texts(monkeypatch, caplog):
    """Longest texts first: after 10 s, one text of ten done but half the tokens, the ETA is
    the 10 s the other half takes, not the 90 s a texts/s rate would say."""
    import pipeline.features as features

    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr(features.time, "monotonic", lambda: next(clock))
    progress = features.TextProgress("features x", 10, every=0.0, work=100)
    with caplog.at_level(logging.INFO, logger="pipeline.features"):
        progress.add(1, 50)
        progress.add(9, 50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].endswith("1/10 texts (10%), 0 texts/s, ETA 10s"), lines
    assert lines[1].endswith("10/10 texts (100%), 0 texts/s, ETA 0s"), lines
