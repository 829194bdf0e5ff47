"""Fine-tuning on the tiny random BERT: the token-state cache of the bottom layers, gradients
only in the top layers, length-bucketed batches, per-group learning rates, a whole-encoder run,
a local-mode run whose loss falls, a rerun that never runs the bottom layers, and export parity
with the fine-tuned layers in the graph."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ort_logits, tiny_config_dict

from pipeline.cli import main
from pipeline.config import OptimConfig, parse_config, resolve_paths
from pipeline.data import load_tasks
from pipeline.features import load_tokenizer
from pipeline.model import Encoder, MultiTaskHeads, cached_layers, load_encoder
from pipeline.token_cache import TokenStateCache, TokenStates
from pipeline.train import loop, sampler
from pipeline.train.device import autocast_context

TEXTS = [
    "the good film was great",
    "bad",
    "the pizza and the bread and the soup were very nice",
    "it is a robot",
]


def _fresh_lower(encoder: Encoder, tokenizer, text: str, n: int) -> torch.Tensor:
    enc = tokenizer([text], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return encoder.lower_states(enc["input_ids"], enc["attention_mask"], n)[0]


def test_cached_states_equal_a_fresh_forward_of_the_lower_layers(tiny_encoder_dir, tmp_path):
    encoder = load_encoder(tiny_encoder_dir).eval()
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    cache = TokenStateCache(tmp_path, str(tiny_encoder_dir), n_layers=1, max_length=16)
    entry = cache.get(TEXTS)
    assert cache.computed == len(TEXTS)
    assert entry.states.dtype == np.float16 and isinstance(entry.states, np.memmap)
    # Stored longest first: the offsets follow descending length.
    by_offset = np.argsort(entry.offsets)
    assert list(entry.lengths[by_offset]) == sorted(entry.lengths, reverse=True)
    for i, text in enumerate(TEXTS):
        fresh = _fresh_lower(encoder, tokenizer, text, 1)
        assert entry.lengths[i] == fresh.shape[0]
        start = entry.offsets[i]
        cached = torch.from_numpy(entry.states[start : start + entry.lengths[i]].astype(np.float32))
        torch.testing.assert_close(cached, fresh, rtol=2e-3, atol=2e-3)  # fp16 storage
    # Not vacuous: the states after one block differ from those after the embeddings alone.
    emb = _fresh_lower(encoder, tokenizer, TEXTS[0], 0)
    assert not torch.allclose(emb, _fresh_lower(encoder, tokenizer, TEXTS[0], 1), atol=1e-2)
    # A second cache object reads the entry from disk, computing nothing.
    again = TokenStateCache(tmp_path, str(tiny_encoder_dir), n_layers=1, max_length=16)
    assert np.array_equal(again.get(TEXTS).states, entry.states) and again.computed == 0
    # The key separates layers and max length.
    other = TokenStateCache(tmp_path, str(tiny_encoder_dir), n_layers=1, max_length=8)
    assert other.path_for(TEXTS) != cache.path_for(TEXTS)


def test_get_many_computes_shared_texts_once_and_stores_each_list(tiny_encoder_dir, tmp_path):
    """Lists that share texts (senteval6's splits do) are computed in one pass over their
    distinct texts; each list gets its own entry, equal to the one it would get alone."""
    a = TEXTS[:3]
    b = [TEXTS[2], TEXTS[3], TEXTS[0], TEXTS[2]]  # shares two texts with a, one twice
    cache = TokenStateCache(tmp_path / "many", str(tiny_encoder_dir), n_layers=1, max_length=16)
    got = cache.get_many([(a, "a"), (b, "b")])
    assert cache.computed == len(TEXTS)  # 4 distinct texts, not 3 + 4
    alone = TokenStateCache(tmp_path / "alone", str(tiny_encoder_dir), n_layers=1, max_length=16)
    for texts, entry in zip((a, b), got, strict=True):
        assert entry.path == cache.path_for(texts) and len(entry) == len(texts)
        ref = alone.get(texts)
        assert np.array_equal(entry.lengths, ref.lengths)
        for i in range(len(texts)):
            mine = entry.states[entry.offsets[i] : entry.offsets[i] + entry.lengths[i]]
            theirs = ref.states[ref.offsets[i] : ref.offsets[i] + ref.lengths[i]]
            np.testing.assert_allclose(mine, theirs, atol=2e-3)
        # The same layout as a list computed alone: rows stored longest first.
        by_offset = np.argsort(entry.offsets)
        assert list(entry.lengths[by_offset]) == sorted(entry.lengths, reverse=True)
    # Only the lists' entries are left (the distinct texts' scratch entry is removed), and a
    # new cache object reads both from disk.
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(
        cache.path_for(x).name for x in (a, b)
    )
    again = TokenStateCache(tmp_path / "many", str(tiny_encoder_dir), n_layers=1, max_length=16)
    again.get_many([(b, "b"), (a, "a")])
    assert again.computed == 0


def test_top_layers_on_cached_states_equal_the_whole_forward(tiny_encoder_dir, tmp_path):
    encoder = load_encoder(tiny_encoder_dir).eval()
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    entry = TokenStateCache(tmp_path, str(tiny_encoder_dir), 1, 16).get(TEXTS)
    states, mask = entry.batch(np.arange(len(TEXTS)))
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        halves = encoder.forward_from(torch.from_numpy(states), torch.from_numpy(mask), 1)
        whole = encoder(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(torch.from_numpy(mask), enc["attention_mask"])
    torch.testing.assert_close(halves, whole, rtol=2e-3, atol=2e-3)
    assert encoder.check_layerwise(enc["input_ids"], enc["attention_mask"]) < 1e-5


def test_cached_layers():
    assert cached_layers(2, 6) == 4
    assert cached_layers(1, 2) == 1
    assert cached_layers(0, 6) == 0  # frozen: pooled features are cached instead
    assert cached_layers(6, 6) == 0 and cached_layers("all", 6) == 0  # from token ids


def _module(tiny_encoder_dir, trainable: int | str, start: int) -> loop.TrainModule:
    torch.manual_seed(0)
    encoder = load_encoder(tiny_encoder_dir, trainable_layers=trainable)
    heads = MultiTaskHeads(32, {"sentiment": 2, "topic": 3}, capacity=8)
    return loop.TrainModule(heads, encoder, start_layer=start)


def test_only_the_top_layers_get_gradients(tiny_encoder_dir, tmp_path):
    module = _module(tiny_encoder_dir, 1, 1)
    module.train()
    entry = TokenStateCache(tmp_path, str(tiny_encoder_dir), 1, 16).get(TEXTS)
    states, mask = entry.batch(np.arange(4))
    inputs = {"states": torch.from_numpy(states), "attention_mask": torch.from_numpy(mask)}
    logits, aux = module(inputs, "topic", with_aux=True)
    labels = torch.tensor([0, 1, 2, 0])
    (torch.nn.functional.cross_entropy(logits, labels) + aux.sum() * 0).backward()
    layers = module.encoder.transformer.encoder.layer
    top = [p.grad for p in layers[1].parameters()]
    assert all(g is not None for g in top) and sum(float(g.abs().sum()) for g in top) > 0
    assert all(p.grad is None for p in layers[0].parameters())
    assert all(p.grad is None for p in module.encoder.transformer.embeddings.parameters())
    assert all(p.grad is None for p in module.encoder.transformer.pooler.parameters())


def test_whole_encoder_trains_embeddings_and_runs_under_bf16_autocast(tiny_encoder_dir):
    module = _module(tiny_encoder_dir, "all", 0)
    trainable = {n for n, p in module.encoder.transformer.named_parameters() if p.requires_grad}
    assert any(n.startswith("embeddings.") for n in trainable)
    assert any(n.startswith("encoder.layer.0.") for n in trainable)
    assert not any(n.startswith("pooler.") for n in trainable)  # unused by pooling
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    # The GPU path's bf16 autocast, exercised on the CPU (slowly, as on a GPU-less machine).
    with autocast_context("bf16", "cpu"):
        logits, _ = module(inputs, "sentiment")
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([1, 0, 1, 0]))
    assert logits.dtype == torch.bfloat16
    loss.backward()
    grad = module.encoder.transformer.embeddings.word_embeddings.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_param_groups_layer_decay_and_separate_warmup(tiny_encoder_dir):
    module = _module(tiny_encoder_dir, "all", 0)
    ocfg = OptimConfig(
        lr=1e-2, encoder_lr=1e-3, layer_decay=0.5, warmup_ratio=0.0, encoder_warmup_ratio=0.5
    )
    optimizer = loop.make_optimizer(module, ocfg)
    groups = optimizer.param_groups
    assert [g["kind"] for g in groups] == ["heads", "encoder", "encoder", "encoder"]
    assert [g["initial_lr"] if "initial_lr" in g else g["lr"] for g in groups] == pytest.approx(
        [1e-2, 1e-3, 5e-4, 2.5e-4]  # heads, top layer, bottom layer, embeddings
    )
    layers = module.encoder.transformer.encoder.layer
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in layers[1].parameters()}
    n_trainable = sum(1 for p in module.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    scheduler = loop.make_scheduler(optimizer, ocfg, total_steps=10)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == pytest.approx(1e-2)  # heads: no warm-up
    assert lrs[1] == pytest.approx(1e-3 / 5)  # encoder: step 1 of 5 warm-up steps
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-3)  # warm-up done
    assert optimizer.param_groups[0]["lr"] < 1e-2  # heads already decaying (cosine)


def test_bucketed_batches_are_disjoint_across_ranks_and_similar_in_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000)
    seen = []
    for rank in range(2):
        gen = sampler.bucketed_batches(lengths, 16, 0, 0, 0, rank, 2, bucket_batches=8)
        batches = [next(gen) for _ in range(32)]  # one pass: 500 rows per rank
        rows = np.concatenate(batches)
        assert len(rows) == len(set(rows)) == 500
        seen.append(set(rows))
        spread = np.mean([np.ptp(lengths[b]) for b in batches])
        assert spread < 0.3 * np.ptp(lengths), spread  # random batches span nearly all of it
        again = sampler.bucketed_batches(lengths, 16, 0, 0, 0, rank, 2, bucket_batches=8)
        assert all(np.array_equal(next(again), b) for b in batches)  # replayable
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 1000


def _config(tmp: Path, data: Path, encoder: Path, trainable: int | str, **train) -> Path:
    raw = tiny_config_dict(data, encoder, tmp / "runs", tmp / "cache")
    raw["encoder"]["trainable_layers"] = trainable
    raw["optim"]["encoder_lr"] = 1e-3
    raw["train"].update(train)
    path = tmp / f"tiny-{trainable}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(path: Path) -> Path:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path)]) == 0
    return Path(out.getvalue().split("run directory: ")[-1].strip())


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    """A tiny local-mode run fine-tuning the top layer on cached bottom-layer states."""
    tmp = tmp_path_factory.mktemp("finetune-run")
    return _train(_config(tmp, tiny_data_dir, tiny_encoder_dir, 1, epochs=8))


def test_finetuned_run_loss_falls_and_the_top_layer_trained(finetuned_run, tiny_encoder_dir):
    from pipeline.runs import load_run

    rec = json.loads((finetuned_run / "run.json").read_text())
    assert rec["encoder"]["trainable_layers"] == 1 and rec["encoder"]["cached_layers"] == 1
    joint = [h for h in rec["history"] if h["stage"] == "joint"]
    first, last = (sum(h["train_loss"].values()) for h in (joint[0], joint[-1]))
    assert last < 0.8 * first, (first, last)
    pretrained = load_encoder(tiny_encoder_dir).transformer.state_dict()
    trained = load_run(finetuned_run).model.encoder.transformer.state_dict()
    changed = {k.split(".")[2] for k in pretrained if k.startswith("encoder.layer.")
               and not torch.equal(pretrained[k], trained[k])}  # fmt: skip
    assert changed == {"1"}  # the top layer trained, the cached bottom layer did not
    assert torch.equal(
        pretrained["embeddings.word_embeddings.weight"],
        trained["embeddings.word_embeddings.weight"],
    )


def test_evaluate_a_finetuned_run_from_token_ids(finetuned_run, tmp_path):
    """evaluate runs the whole fine-tuned encoder in fp32; training read fp16 cached states:
    the two agree to within one example per task."""
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(finetuned_run), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    rec = json.loads((finetuned_run / "run.json").read_text())
    for task, m in res["tasks"].items():
        assert abs(m["accuracy"] - rec["dev"][task]["accuracy"]) <= 100 / m["n"] + 1e-9


def test_a_filled_cache_never_runs_the_lower_layers(
    tmp_path, tiny_data_dir, tiny_encoder_dir, monkeypatch, caplog
):
    from pipeline.train.driver import prepare_inputs

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    raw["encoder"]["trainable_layers"] = 1
    config = resolve_paths(parse_config(raw), base=tmp_path)
    tasks = load_tasks(config)
    first = prepare_inputs(config, tasks, str(tiny_encoder_dir))
    assert first.encoder is not None and first.encoder.cached_layers == 1

    def never(*args, **kwargs):
        raise AssertionError("the lower layers ran although their states are cached")

    monkeypatch.setattr(Encoder, "lower_states", never)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        second = prepare_inputs(config, tasks, str(tiny_encoder_dir))
    assert "the lower 1 layers were not run" in caplog.text
    for split in ("train", "dev"):
        a, b = getattr(first, split)["topic"], getattr(second, split)["topic"]
        assert a.path == b.path and np.array_equal(a.labels, b.labels)
    assert np.array_equal(first.feature_mean, second.feature_mean)
    assert TokenStates.open(second.train["topic"].path).lengths.shape == (48,)


def test_whole_encoder_run_on_cpu(tmp_path, tiny_data_dir, tiny_encoder_dir):
    run_dir = _train(_config(tmp_path, tiny_data_dir, tiny_encoder_dir, "all", epochs=2))
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["encoder"]["trainable_layers"] == "all" and rec["encoder"]["cached_layers"] == 0
    assert not (tmp_path / "cache" / "token_states").exists()  # no cache on this path
    assert [h["stage"] for h in rec["history"]] == ["joint", "joint", "align", "align", "final"]


def test_export_carries_the_finetuned_layers(finetuned_run, tmp_path, tiny_encoder_dir):
    from pipeline.export import export_run
    from pipeline.runs import load_run

    result = export_run(finetuned_run, register=False, output_dir=tmp_path / "artifact")
    parity = result.metadata.parity
    assert parity.passed and parity.max_abs_diff <= 1e-4
    texts = ["the good film was great", "the pizza and the soup"]
    onnx = ort_logits(result.artifact_dir, texts, ["sentiment", "topic"])
    run = load_run(finetuned_run)
    tokenizer = load_tokenizer(str(tiny_encoder_dir))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        eager = run.model(enc["input_ids"], enc["attention_mask"])
        run.model.encoder.load_state_dict(load_encoder(tiny_encoder_dir).state_dict())
        pretrained = run.model(enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(onnx["topic"], eager[1].numpy(), atol=1e-4)
    # Not vacuous: the same heads on the pretrained encoder give other logits.
    assert not np.allclose(onnx["topic"], pretrained[1].numpy(), atol=1e-3)
    # The artifact says which blocks the run changed: the top one of the tiny encoder's.
    info = result.metadata.encoder
    assert info.trainable_layers == 1 and info.fine_tuned_blocks == [run.model.encoder.n_layers]


def test_fine_tuned_blocks_are_named_for_every_setting():
    from types import SimpleNamespace

    from pipeline.export import fine_tuned_blocks

    six = SimpleNamespace(n_layers=6)
    assert fine_tuned_blocks(0, six) == []
    assert fine_tuned_blocks(2, six) == [5, 6]
    assert fine_tuned_blocks("all", six) == [1, 2, 3, 4, 5, 6]


def test_svd_weights_with_a_finetuned_encoder_use_pretrained_pooled_features(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    from pipeline.train.driver import prepare_inputs, task_weights

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    raw["encoder"]["trainable_layers"] = 1
    raw["weighting"] = {"method": "svd", "rank": 1}
    config = resolve_paths(parse_config(raw), base=tmp_path)
    tasks = load_tasks(config)
    prepared = prepare_inputs(config, tasks, str(tiny_encoder_dir))
    assert {t: f.shape for t, f in prepared.train_features.items()} == {
        "sentiment": (48, 32),
        "topic": (48, 32),
    }
    weights = task_weights(config, tasks, prepared.train_features)
    assert np.mean(list(weights.values())) == pytest.approx(1.0)
    assert weights["sentiment"] != weights["topic"]


def test_transfer_suite_with_a_finetuned_encoder(tmp_path, tiny_data_dir, tiny_encoder_dir):
    """The suites run fine-tuned: the token states are computed once, before the runs, and
    every run (single-task and multi-task) reads them."""
    path = _config(tmp_path, tiny_data_dir, tiny_encoder_dir, 1, epochs=2)
    out = io.StringIO()
    argv = ["experiment", str(path), "--suite", "transfer", "--in-process", "--seeds", "1"]
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--output", str(tmp_path / "suite")]) == 0
    assert "computing the cached bottom-layer token states once for all runs" in out.getvalue()
    numbers = json.loads((tmp_path / "suite" / "results.json").read_text())
    assert numbers["meta"]["n_runs"] == 8 and numbers["meta"]["n_failed"] == 0
    for log in (tmp_path / "suite" / "logs").glob("*.log"):
        text = log.read_text()
        assert "the lower 1 layers were not run" in text and "computing layers" not in text
    record = json.loads(
        (Path(numbers["runs"]["single-topic-s0"]["run_dir"]) / "run.json").read_text()
    )
    assert record["encoder"]["cached_layers"] == 1 and list(record["tasks"]) == ["topic"]
