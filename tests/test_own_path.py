"""The own path (issue 13, routing.own): a task's own copy of the fine-tuned top blocks.

The rule (`decide_own`) on synthetic correctness; the config's limits; and, on the tiny
2-block encoder with its top block fine-tuned, a run that trains own paths: what run.json
records, that the stored model answers as training measured, and that the exported graph (one
pass: the bottom block once, the top block once more for the own task) equals PyTorch, splits
at the heads and serves the route on /tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_task_rows, ort_logits, tiny_config_dict

from pipeline.routing import decide, decide_own, format_route

TASKS = ["sentiment", "topic"]


def _correct(n: int, both: int, own_only: int, route_only: int) -> tuple[np.ndarray, np.ndarray]:
    """(route right, own right) over n items with the given overlaps."""
    route = np.zeros(n, bool)
    own = np.zeros(n, bool)
    route[:both] = own[:both] = True
    own[both : both + own_only] = True
    route[both + own_only : both + own_only + route_only] = True
    return route, own


def _base(route_right: np.ndarray) -> object:
    """A shared/private decision whose chosen path (private) answers `route_right`."""
    return decide(~route_right, route_right, margin_se=1.0)


def test_the_own_path_is_taken_only_on_a_clear_lead_over_the_route():
    route, own = _correct(1000, 800, 60, 10)  # +5.0 points, SE ~0.8: clear
    d = decide_own(_base(route), route, own, margin_se=1.0, layers=3)
    assert d.path == "own" and d.base_path == "private"
    assert d.own.against == "private" and d.own.layers == 3
    assert d.own.difference == pytest.approx(5.0)
    assert d.chosen_accuracy == pytest.approx(d.own.accuracy) == pytest.approx(86.0)
    assert "own  86.00 vs private, +5.00" in format_route(d)

    route, own = _correct(1000, 800, 14, 10)  # +0.4 points, SE ~0.5: not enough
    d = decide_own(_base(route), route, own, margin_se=1.0, layers=3)
    assert d.path == "private" and d.own is not None and d.own.difference == pytest.approx(0.4)
    assert d.chosen_accuracy == pytest.approx(81.0)
    # With no margin, any lead is taken; a tie or a loss never is.
    assert decide_own(_base(route), route, own, margin_se=0.0, layers=3).path == "own"
    for own_only, route_only in ((10, 10), (0, 0), (5, 30)):
        route, own = _correct(1000, 800, own_only, route_only)
        assert decide_own(_base(route), route, own, margin_se=0.0, layers=3).path == "private"


def test_the_own_epoch_is_picked_on_dev_and_the_shared_route_is_kept_as_the_base():
    route, good = _correct(400, 300, 60, 0)
    bad = np.zeros(400, bool)
    shared_base = decide(route, ~route, margin_se=1.0)  # the shared path answers `route`
    assert shared_base.path == "shared"
    d = decide_own(shared_base, route, np.stack([bad, good, bad]), margin_se=1.0, layers=1)
    assert d.path == "own" and d.own.epoch == 2 and d.own.against == "shared"
    assert d.base_path == "shared" and d.shared_accuracy == shared_base.shared_accuracy
    # The cross-fitted numbers exist and the own path alone is not optimistic beyond its pick.
    assert d.own.crossfit_accuracy is not None and d.own.routed_crossfit_accuracy is not None
    assert d.own.crossfit_accuracy <= d.own.accuracy + 1e-9
    with pytest.raises(ValueError, match="own path"):
        decide_own(shared_base, route, good[:10], margin_se=1.0, layers=1)


def test_own_paths_need_a_partially_fine_tuned_encoder_blocks_it_has_and_known_tasks(tmp_path):
    from pipeline.config import ConfigError, parse_config

    raw = tiny_config_dict(tmp_path, tmp_path, tmp_path / "runs", tmp_path / "cache")
    raw["routing"] = {"own": {"layers": 1}}
    with pytest.raises(ConfigError, match="partially fine-tuned"):
        parse_config(raw, "t")  # frozen encoder
    raw["encoder"]["trainable_layers"] = 1
    assert parse_config(raw, "t").own_path.layers == 1
    raw["routing"]["own"] = {"layers": 2}
    with pytest.raises(ConfigError, match="routing.own.layers"):
        parse_config(raw, "t")
    raw["routing"]["own"] = {"layers": 1, "tasks": ["nope"]}
    with pytest.raises(ConfigError, match="routing.own.tasks"):
        parse_config(raw, "t")
    raw["routing"] = {"enabled": False, "own": {"layers": 1}}
    assert parse_config(raw, "t").own_path is None  # no routing, no own paths


def test_encoder_own_blocks_append_columns_and_the_halves_compose(tiny_encoder_dir):
    """An own copy reads the states entering its first block: the whole forward pass equals
    the cached-states half (forward_from) composed with the bottom blocks, and the own columns
    come after the final features; a copy of the top blocks equals the top blocks' answer."""
    from pipeline.features import load_tokenizer
    from pipeline.model import MultiTaskHeads, load_encoder

    encoder = load_encoder(tiny_encoder_dir, trainable_layers=1).eval()
    d = encoder.dim
    texts = [r["text"] for r in make_task_rows("topic", 6, 3)]
    enc = load_tokenizer(str(tiny_encoder_dir))(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        plain = encoder(ids, mask)
        encoder.add_own_blocks("topic", encoder.pretrained_top_blocks(1))
        assert encoder.own_start == 1 and encoder.out_dim == 2 * d
        x = encoder(ids, mask)
        # An untouched copy answers as the blocks it copies.
        torch.testing.assert_close(x[:, :d], plain)
        torch.testing.assert_close(x[:, d:], plain)
        for block in encoder.own_blocks["topic"]:  # now a different copy
            for p in block.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x = encoder(ids, mask)
        assert (x[:, d:] - plain).abs().max() > 1e-3
        lower = encoder.lower_states(ids, mask, 1)
        torch.testing.assert_close(encoder.forward_from(lower, mask, 1), x, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="same blocks"):
            encoder.add_own_blocks("sentiment", encoder.pretrained_top_blocks(2))

    heads = MultiTaskHeads(d, {"sentiment": 2, "topic": 3}, capacity=4, private_hidden=[4])
    heads.add_own_head("topic", torch.nn.Linear(d, 3))
    heads.set_feature_stats(torch.randn(d), torch.rand(d) + 0.5)
    heads.routes = {"sentiment": "private", "topic": "own"}
    heads.eval()
    with torch.no_grad():
        want = heads.own["topic"]((x[:, d:] - heads.feature_mean) / heads.feature_std)
        torch.testing.assert_close(heads(x, "topic")[0], want)
        # The private and shared paths do not read the own columns.
        blank = x.clone()
        blank[:, d:] = 0.0
        torch.testing.assert_close(heads(x, "sentiment")[0], heads(blank, "sentiment")[0])
        torch.testing.assert_close(
            heads(x, "sentiment", path="shared")[0], heads(blank, "sentiment", path="shared")[0]
        )
    with pytest.raises(ValueError, match="unknown task"):
        heads.add_own_head("nope", torch.nn.Linear(d, 2))


# ----------------------------------------------------- a run that trains own paths end to end
@pytest.fixture(scope="module")
def own_run(tmp_path_factory, tiny_encoder_dir) -> tuple[Path, Path]:
    """A tiny fine-tuned routed run with routing.own; the rule is made to take `topic`'s own
    path whatever its evidence (the rule itself is tested above), so what follows a taken own
    path (storage, loading, export, serving) is exercised on every run of this test."""
    import contextlib
    import io

    import yaml
    from conftest import write_jsonl

    import pipeline.routing as routing
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("own-run")
    data = tmp / "data"
    for name, kind, seed in (("sentiment", "sentiment", 1), ("topic", "topic", 2)):
        write_jsonl(data / name / "train.jsonl", make_task_rows(kind, 64, seed))
        write_jsonl(data / name / "dev.jsonl", make_task_rows(kind, 30, seed + 100))
    raw = tiny_config_dict(data, tiny_encoder_dir, tmp / "runs", tmp / "cache")
    raw["encoder"]["trainable_layers"] = 1
    raw["train"]["epochs"] = 2
    raw["routing"] = {
        "private": {"hidden_sizes": [8], "epochs": 4, "members": 2},
        "own": {"layers": 1, "epochs": 2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    real = routing.decide_own

    calls: list[object] = []

    def take_topic(decision, *args, **kwargs):  # noqa: ANN001, ANN202
        out = real(decision, *args, **kwargs)
        calls.append(out)  # tasks come in task order: topic is the second
        return out.model_copy(update={"path": "own"}) if len(calls) == 2 else out

    mp = pytest.MonkeyPatch()
    mp.setattr(routing, "decide_own", take_topic)  # own_path imports it when it runs
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert main(["train", str(path)]) == 0
    finally:
        mp.undo()
    return Path(out.getvalue().split("run directory: ")[-1].strip()), data


def _dev_accuracy(run_dir: Path, data: Path, task: str) -> float:
    """Dev accuracy of the stored model's route for `task`, from texts (the whole forward
    pass, what is exported)."""
    from pipeline.features import load_tokenizer
    from pipeline.runs import load_run

    run = load_run(run_dir)
    rows = [json.loads(line) for line in (data / task / "dev.jsonl").read_text().splitlines()]
    enc = load_tokenizer(run.record.encoder.path)(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        x = run.model.encoder(enc["input_ids"], enc["attention_mask"])
        pred = run.model.heads(x, task)[0].argmax(-1).numpy()
    labels = run.record.tasks[task].labels
    return 100.0 * float(
        np.mean([labels[k] == r["label"] for k, r in zip(pred, rows, strict=True)])
    )


def test_a_run_with_own_paths_records_them_and_answers_as_it_measured(own_run):
    from pipeline.runs import load_run

    run_dir, data = own_run
    rec = json.loads((run_dir / "run.json").read_text())
    topic, sentiment = rec["routing"]["topic"], rec["routing"]["sentiment"]
    assert topic["path"] == "own" and topic["own"]["layers"] == 1
    assert topic["own"]["against"] in ("shared", "private") and topic["own"]["epoch"] in (1, 2)
    assert sentiment["own"] is not None and sentiment["path"] in ("shared", "private")
    assert rec["stages"]["topic"]["route"]["path"] == "own"
    # run.json's dev numbers are the routed model's: the own path's for topic.
    assert rec["dev"]["topic"]["accuracy"] == pytest.approx(topic["own"]["accuracy"])
    assert rec["stages"]["topic"]["final"] == pytest.approx(topic["own"]["accuracy"])
    assert rec["dev_macro_accuracy"] == pytest.approx(
        np.mean([rec["dev"][t]["accuracy"] for t in TASKS])
    )
    run = load_run(run_dir)
    assert list(run.model.encoder.own_blocks) == ["topic"] and list(run.model.heads.own) == [
        "topic"
    ]
    # Only the task that took it keeps the copy: sentiment's was dropped.
    assert run.model.encoder.out_dim == 2 * run.model.encoder.dim
    # Trained on the cached states of the bottom block, the own path answers the same from
    # texts through the whole forward pass.
    assert _dev_accuracy(run_dir, data, "topic") == pytest.approx(topic["own"]["accuracy"])
    from pipeline.evaluate import evaluate_run

    evaluated = evaluate_run(run_dir)["tasks"]  # `polytask evaluate`
    assert evaluated["topic"]["accuracy"] == pytest.approx(topic["own"]["accuracy"])


def test_own_paths_export_split_and_serve_their_route(own_run, tmp_path):
    """The exported graph: onnxruntime equals PyTorch for both tasks, the serving cut composes
    to the whole graph, and /tasks' route for topic is the own path with its evidence."""
    import onnxruntime as ort

    from pipeline.export import export_run
    from pipeline.features import load_tokenizer
    from pipeline.runs import load_run
    from serving.graph import split_heads
    from serving.service import with_routes

    run_dir, _ = own_run
    result = export_run(run_dir, register=False, output_dir=tmp_path / "artifact")
    assert result.metadata.parity.passed
    texts = [r["text"] for r in make_task_rows("topic", 7, 5)]
    onnx = ort_logits(result.artifact_dir, texts, TASKS)
    run = load_run(run_dir)
    enc = load_tokenizer(run.record.encoder.path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        for t, want in zip(TASKS, run.model(enc["input_ids"], enc["attention_mask"]), strict=True):
            np.testing.assert_allclose(onnx[t], want.numpy(), atol=1e-4)

    parts = split_heads(result.artifact_dir / "model.onnx")
    assert parts is not None
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    middle = ort.InferenceSession(parts.encoder).run(parts.boundary, feeds)
    out = ort.InferenceSession(parts.heads).run(
        None, dict(zip(parts.boundary, middle, strict=True))
    )
    for t, got in zip(TASKS, out, strict=True):
        np.testing.assert_allclose(got, onnx[t], atol=1e-4)

    metadata = result.metadata
    info = with_routes({"tasks": {t: {} for t in TASKS}}, metadata)
    route = info["tasks"]["topic"]["route"]
    assert route["path"] == "own" and route["own"]["layers"] == 1
    assert info["tasks"]["sentiment"]["route"]["own"] is not None


def test_add_and_remove_task_refuse_a_parent_with_own_paths(own_run):
    from pipeline.incremental import IncrementalError, add_tasks, new_task_config, remove_tasks

    run_dir, data = own_run
    with pytest.raises(IncrementalError, match="own path"):
        add_tasks(
            run_dir,
            [
                new_task_config(
                    "again", train=data / "topic" / "train.jsonl", dev=data / "topic" / "dev.jsonl"
                )
            ],
        )
    with pytest.raises(IncrementalError, match="own path"):
        remove_tasks(run_dir, ["sentiment"])


# ------------------------------------------------------------------- the transfer suite's own
def test_transfer_suite_own_variant_reports_own_paths_beside_the_route():
    """`--variants own`: the routed run plus own paths; its routing section adds the own
    path's accuracy and how often it was taken, and its cross-fitted column is the own-or-route
    choice's."""
    from pipeline.config import parse_config
    from pipeline.experiments import transfer
    from pipeline.experiments.options import ExperimentOptions

    raw = {
        "name": "two",
        "tasks": [{"name": "a"}, {"name": "b"}],
        "encoder": {"trainable_layers": 3},
        "routing": {"own": {"layers": 2, "margin_se": 2.0}},
    }
    base = parse_config(raw)
    specs = transfer.plan(base, [0], ExperimentOptions(variants=("routed", "own")))
    own_spec = next(s for s in specs if s.variant == "own")
    assert own_spec.overrides["routing.own"]["layers"] == 2  # the config's own settings
    assert own_spec.overrides["routing.own"]["margin_se"] == 2.0
    assert "own" not in transfer.DEFAULT_VARIANTS

    def run(acc: float, path: str) -> dict:
        own = {"accuracy": acc + 1.0, "routed_crossfit_accuracy": acc - 0.1}
        route = {"path": path, "shared_accuracy": acc - 1, "private_accuracy": acc,
                 "crossfit_accuracy": acc - 0.5, "private_crossfit_accuracy": acc - 0.5,
                 "own": own}  # fmt: skip
        dev = acc + 1.0 if path == "own" else acc
        return {"status": "ok", "dev": {"a": dev, "b": dev},
                "stages": {"a": {"route": route}, "b": {"route": route}}}  # fmt: skip

    single = {("a", 0): 80.0, ("b", 0): 80.0, ("a", 1): 80.0, ("b", 1): 80.0}
    out = transfer.routing_analysis(
        ["a", "b"], [0, 1], single, [run(80.0, "own"), run(80.0, "private")]
    )
    row = out["tasks"]["a"]
    assert row["own_chosen"] == 1 and row["private_chosen"] == 1
    assert row["own"]["mean"] == pytest.approx(81.0)
    assert row["routed"]["mean"] == pytest.approx(80.5)
    assert row["crossfit"]["mean"] == pytest.approx(79.9)  # own-or-route, cross-fitted
    text = "\n".join(transfer.routing_section(out, ["a", "b"], "routed + own paths", planned=2))
    assert "| own path |" in text and "| own chosen |" in text and "1/2" in text


def test_serve_bench_counts_the_own_paths_blocks_and_heads(own_run):
    """bench/serve.py's compute model: the own copy's blocks beside the encoder's, and the
    own head (not the shared path) for the task it answers."""
    from conftest import load_repo_script

    from pipeline.runs import load_run

    bench = load_repo_script("bench/serve.py")
    run_dir, _ = own_run
    assert bench.own_blocks(run_dir) == 1
    heads = load_run(run_dir).model.heads
    own = sum(2 * p.numel() for p in heads.own["topic"].parameters() if p.dim() >= 2)
    sentiment = heads.routes["sentiment"]
    if sentiment == "private":
        other = sum(2 * p.numel() for p in heads.private["sentiment"].parameters() if p.dim() >= 2)
    else:
        other = 2 * heads.alignment["sentiment"].numel() + sum(
            2 * p.numel()
            for m in (heads.shared, heads.towers["sentiment"])
            for p in m.parameters()
            if p.dim() >= 2
        )
    assert bench.heads_gflop(run_dir) == pytest.approx((own + other) / 1e9)


def test_own_paths_train_on_the_drivers_gpu_only_when_the_run_asks_and_it_has_one(caplog):
    from pipeline.train.device import driver_device

    assert driver_device(use_gpu=True, cuda_available=True) == "cuda"
    assert driver_device(use_gpu=False, cuda_available=True) == "cpu"
    assert not caplog.records
    assert driver_device(use_gpu=True, cuda_available=False) == "cpu"
    assert "no CUDA device" in caplog.text


def test_own_paths_are_trained_once_and_only_where_the_config_asks(own_run, tmp_path):
    import shutil

    from pipeline.own_path import OwnPathError, train_own_paths

    run_dir, _ = own_run
    with pytest.raises(OwnPathError, match="trained already"):
        train_own_paths(run_dir)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    rec = json.loads((copy / "run.json").read_text())
    rec["config"]["routing"]["own"] = None
    (copy / "run.json").write_text(json.dumps(rec))
    with pytest.raises(OwnPathError, match="routing.own is not set"):
        train_own_paths(copy)


def test_routing_analysis_without_own_paths_has_no_own_column():
    """A routed run without routing.own adds no own entry (a mean of nothing would be NaN,
    which is neither equal to itself nor JSON)."""
    from pipeline.experiments import transfer

    route = {"path": "private", "shared_accuracy": 79.0, "private_accuracy": 80.0,
             "crossfit_accuracy": 79.5, "private_crossfit_accuracy": 79.5}  # fmt: skip
    run = {"status": "ok", "dev": {"a": 80.0}, "stages": {"a": {"route": route}}}
    out = transfer.routing_analysis(["a"], [0], {("a", 0): 80.0}, [run])
    assert "own" not in out["tasks"]["a"] and "own_chosen" not in out["tasks"]["a"]
    assert out == json.loads(json.dumps(out, allow_nan=False))
    assert "own path" not in "\n".join(transfer.routing_section(out, ["a"]))


def test_routing_report_with_own_paths_for_some_tasks_marks_the_others():
    """routing.own.tasks: the tasks without an own path get "-" in the own columns (the
    report once failed with KeyError 'own' after a whole suite had trained)."""
    from pipeline.experiments import transfer

    def route(own: dict | None) -> dict:
        r = {"path": "private", "shared_accuracy": 79.0, "private_accuracy": 80.0,
             "crossfit_accuracy": 79.5, "private_crossfit_accuracy": 79.5}  # fmt: skip
        return {**r, "own": own} if own else r

    own = {"accuracy": 82.0, "routed_crossfit_accuracy": 80.5}
    run = {"status": "ok", "dev": {"a": 80.0, "b": 80.0},
           "stages": {"a": {"route": route(own)}, "b": {"route": route(None)}}}  # fmt: skip
    single = {("a", 0): 80.0, ("b", 0): 80.0}
    out = transfer.routing_analysis(["a", "b"], [0], single, [run])
    assert "own" in out["tasks"]["a"] and "own" not in out["tasks"]["b"]
    lines = transfer.routing_section(out, ["a", "b"], "routed + own paths", planned=1)
    rows = {x.split("|")[1].strip(): x for x in "\n".join(lines).splitlines() if x[:2] == "| "}
    cells = [c.strip() for c in rows["b"].strip("|").split("|")]
    assert cells[4] == "-" and cells[9] == "-"  # own path, own chosen
    assert "0/1" in rows["a"] and "82.00" in rows["a"]
