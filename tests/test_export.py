"""Export (DESIGN section 3): a tiny local-mode run -> model.onnx + tokenizer + metadata.json ->
BentoML model store. Claims checked: onnxruntime equals PyTorch on several shapes, padded and
unpadded; the graph has the contract's names and no self-auxiliary towers; served predictions
equal `pipeline.evaluate`'s; a failed check leaves nothing behind; int8 is gated on accuracy."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ort_logits, train_tiny_run, use_bentoml_home

from pipeline.cli import main
from serving.artifact import ArtifactMetadata

TASKS = ["sentiment", "topic"]
MAX_LENGTH = 16  # tiny_config_dict's encoder.max_length


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    """One tiny local-mode run shared by the tests below."""
    return train_tiny_run(tmp_path_factory.mktemp("export-run"), tiny_data_dir, tiny_encoder_dir)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The fp32 artifact of the run (not registered)."""
    from pipeline.export import export_run

    out = tmp_path_factory.mktemp("export-out") / "artifact"
    return export_run(run_dir, register=False, output_dir=out)


@pytest.fixture(scope="module")
def dynamo_graph(run_dir, tmp_path_factory) -> Path:
    """The run's serving graph written by the dynamo exporter (what int8 exports use)."""
    from pipeline.export import export_onnx
    from pipeline.runs import load_run

    path = tmp_path_factory.mktemp("dynamo-graph") / "model.onnx"
    model = load_run(run_dir).model
    assert export_onnx(model, list(model.heads.tasks), MAX_LENGTH, path, "dynamo") == "dynamo"
    return path


@pytest.fixture
def reuse_graph(exported, dynamo_graph, monkeypatch) -> None:
    """Skip torch.onnx.export (seconds per call) in tests about later steps: the graphs of this
    run are deterministic, so the ones exported once stand in for a fresh export."""
    import shutil

    import pipeline.export as export

    graphs = {"torchscript": exported.artifact_dir / "model.onnx", "dynamo": dynamo_graph}

    def copy_graph(model, tasks, max_length, path, exporter="torchscript"):
        shutil.copyfile(graphs[exporter], path)
        return exporter

    monkeypatch.setattr(export, "export_onnx", copy_graph)


@pytest.fixture
def bentoml_home(tmp_path) -> Path:
    with use_bentoml_home(tmp_path / "bentoml") as home:
        yield home


def _ort_predict(artifact: Path, task: str, texts: list[str]) -> np.ndarray:
    """Predictions as serving computes them: tokenizers + onnxruntime, no torch."""
    return ort_logits(artifact, texts, [task])[task].argmax(axis=-1)


def test_parity_on_several_shapes_padded_and_unpadded(exported):
    parity = exported.metadata.parity
    assert parity.passed and parity.tolerance == 1e-4
    assert parity.max_abs_diff <= 1e-4
    shapes = {(c.batch_size, c.seq_len, c.padded) for c in parity.cases}
    seq_lens = {s for _, s, _ in shapes}
    assert {b for b, _, _ in shapes} == {1, 3, 8}
    assert len(seq_lens) >= 3 and MAX_LENGTH in seq_lens
    for b, s, _ in shapes:  # every shape both padded and unpadded
        assert (b, s, True) in shapes and (b, s, False) in shapes
    assert all(c.max_abs_diff <= 1e-4 for c in parity.cases)
    assert parity.max_abs_diff == max(c.max_abs_diff for c in parity.cases)


def test_onnx_graph_has_contract_names_and_no_aux_towers(exported):
    import onnx

    files = sorted(p.name for p in exported.artifact_dir.iterdir())
    assert "model.onnx" in files and "tokenizer.json" in files and "metadata.json" in files
    assert not [f for f in files if f.endswith(".data")]  # weights inside model.onnx
    proto = onnx.load(str(exported.artifact_dir / "model.onnx"))
    graph = proto.graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = value.type.tensor_type.shape.dim
        assert all(d.dim_param for d in dims), "batch and seq must be dynamic"
    assert [o.name for o in graph.output] == [f"logits_{t}" for t in TASKS]
    classes = [o.type.tensor_type.shape.dim[1].dim_value for o in graph.output]
    assert classes == [len(t.labels) for t in exported.metadata.tasks] == [2, 3]
    assert not [i.name for i in graph.initializer if "aux" in i.name]
    # Each task's answering path is there: its main tower, or its private head when routed
    # there (routing prefers the private path unless dev shows sharing better).
    for task in exported.metadata.tasks:
        part = "private" if task.route is not None and task.route.path == "private" else "towers"
        assert any(f"{part}.{task.name}." in i.name for i in graph.initializer), task.name


def test_onnx_predictions_equal_pipeline_evaluate(exported, run_dir):
    from pipeline.data import load_tasks
    from pipeline.evaluate import predict_features, run_features
    from pipeline.runs import load_run

    run = load_run(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    for task in load_tasks(run.config, splits=["dev"], labels=run.labels):
        split = task.splits["dev"]
        want = predict_features(run, task.name, run_features(run, split.texts, "dev"))
        got = _ort_predict(exported.artifact_dir, task.name, split.texts)
        np.testing.assert_array_equal(got, want)
        accuracy = 100 * float(np.mean(got == split.labels))
        assert accuracy == pytest.approx(record["dev"][task.name]["accuracy"], abs=1e-6)


def test_tokenizer_json_tokenizes_like_transformers(exported, tiny_encoder_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    texts = ["good pizza", "the team was very nice " * 10, "a"]
    want = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))(
        texts, padding=True, truncation=True, max_length=MAX_LENGTH
    )
    enc = Tokenizer.from_file(str(exported.artifact_dir / "tokenizer.json")).encode_batch(texts)
    assert [e.ids for e in enc] == want["input_ids"]
    assert [e.attention_mask for e in enc] == want["attention_mask"]
    assert len(enc[1].ids) == MAX_LENGTH  # the long text is truncated


def test_metadata_validates_and_records_the_run(exported, run_dir):
    meta = ArtifactMetadata.read(exported.artifact_dir)
    assert meta == exported.metadata
    record = json.loads((run_dir / "run.json").read_text())
    assert meta.model_name == "polytask-tiny"
    assert meta.run_id == record["run_name"] == run_dir.name
    assert meta.precision == "fp32" and meta.quantization is None
    assert meta.task_names == TASKS
    for info in meta.tasks:
        assert info.labels == record["tasks"][info.name]["labels"]  # index order
        assert info.output == f"logits_{info.name}"
        assert info.dev.accuracy == pytest.approx(record["dev"][info.name]["accuracy"])
    assert meta.tasks[1].labels == ["food", "sport", "tech"]
    assert meta.dev_macro_accuracy == pytest.approx(record["dev_macro_accuracy"])
    assert meta.encoder.max_length == MAX_LENGTH
    assert meta.encoder.fingerprint == record["encoder"]["fingerprint"]
    assert meta.data_fingerprints == {t: record["tasks"][t]["data_fingerprint"] for t in TASKS}
    canonical = json.dumps(
        record["config"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert meta.config_fingerprint == hashlib.sha256(canonical.encode()).hexdigest()


def test_failed_parity_fails_loudly_and_leaves_no_artifact(
    run_dir, tmp_path, monkeypatch, capsys, reuse_graph
):
    """A graph that diverges from PyTorch on padded batches: exit 2, worst case named, no
    directory written (not even a temporary one)."""
    import pipeline.export as export

    real = export.eager_logits

    def diverging(model, tasks, ids, mask):
        shift = 1e-3 if (mask == 0).any() else 0.0
        return [x + shift for x in real(model, tasks, ids, mask)]

    monkeypatch.setattr(export, "eager_logits", diverging)
    out = tmp_path / "art"
    assert main(["export", str(run_dir), "--output", str(out), "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime and PyTorch disagree" in err
    assert "> tolerance 0.0001" in err and ", padded)" in err
    assert list(tmp_path.iterdir()) == []


def test_int8_is_kept_only_if_no_task_drops_too_much(run_dir, tmp_path, reuse_graph):
    import onnx

    from pipeline.export import INT8_VARIANTS, export_run, write_artifact

    record = json.loads((run_dir / "run.json").read_text())
    # The tiny model's shared module B feeds both tasks: two Gemm nodes share its weights,
    # which onnxruntime's quantizer mishandles unless export un-shares them first.
    result = export_run(run_dir, quantize="int8", register=False, output_dir=tmp_path / "q")
    report = result.metadata.quantization
    assert report is not None
    assert report.max_drop_allowed == 0.5 and set(report.tasks) == set(TASKS)
    # Every variant was tried (the static one calibrated on training texts) and scored
    # through serving.runtime, with its speed next to fp32's.
    assert [v.name for v in report.variants] == [v.name for v in INT8_VARIANTS]
    for v in report.variants:
        assert v.error is None, v.error
        assert v.texts_per_s > 0 and v.fp32_texts_per_s > 0
        assert v.passed == all(q.drop <= 0.5 for q in v.tasks.values())
        for task, q in v.tasks.items():
            # fp32 ONNX accuracy is the trained run's dev accuracy (same predictions).
            assert q.fp32_accuracy == pytest.approx(record["dev"][task]["accuracy"], abs=1e-6)
            assert 0 <= q.int8_accuracy <= 100
            assert q.drop == pytest.approx(q.fp32_accuracy - q.int8_accuracy)
    assert result.metadata.precision == ("int8" if report.kept else "fp32")
    assert (report.variant is not None) == report.kept
    if report.kept:  # the fastest passing variant, faster than fp32
        kept = next(v for v in report.variants if v.name == report.variant)
        assert kept.passed and kept.texts_per_s > kept.fp32_texts_per_s
        assert kept.texts_per_s == max(v.texts_per_s for v in report.variants if v.passed)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert bool(ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DequantizeLinear"}) == (
        report.kept
    )
    assert not any(p.name.startswith(".int8") for p in (tmp_path / "q").iterdir())
    assert ArtifactMetadata.read(tmp_path / "q") == result.metadata

    # A generous gate keeps int8: model.onnx is then the int8 graph, still the same contract,
    # and the metadata says which variant it holds.
    kept = write_artifact(
        run_dir, tmp_path / "k", quantize="int8", max_int8_drop=100.0, min_int8_speedup=0.0
    )
    assert kept.quantization.kept and kept.precision == "int8"
    # Its parity record says it checked the fp32 graph, and gives the int8 graph's own gap
    # (review s24, CLIs 3: before, it described the fp32 graph as if it were the shipped one).
    assert kept.parity.passed and kept.parity.checked == "fp32"
    assert kept.parity.shipped_max_abs_diff > kept.parity.max_abs_diff
    assert result.metadata.parity.checked == ("fp32" if report.kept else "shipped")
    variant = next(v for v in INT8_VARIANTS if v.name == kept.quantization.variant)
    assert kept.quantization.method == variant.method
    graph = onnx.load(str(tmp_path / "k" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert ("DequantizeLinear" in ops) == (variant.method == "static-int8-qdq")
    assert ("MatMulInteger" in ops) == (variant.method == "dynamic-int8")
    assert [o.name for o in graph.output] == [f"logits_{t}" for t in TASKS]
    texts = ["good pizza", "the team was bad"]
    assert _ort_predict(tmp_path / "k", "topic", texts).shape == (2,)


def test_int8_variants_choose_their_nodes(run_dir, tmp_path):
    """Heads stay fp32 unless the variant says otherwise; the FFN output projections (input
    from GELU) are left out by the variant that keeps them fp32; attention's activation x
    activation MatMuls are never quantized, nor a private ensemble's stacked [K, in, out]
    weights (onnxruntime's int8 MatMul refuses them). On the dynamo graph, which int8 exports
    use, with one task on the shared path and one on its private ensemble."""
    import onnx

    from pipeline.export import INT8_VARIANTS, export_onnx, int8_nodes, unshare_gemm_weights
    from pipeline.model import PrivateEnsemble
    from pipeline.runs import load_run

    model = load_run(run_dir).model
    model.heads.routes = {"sentiment": "shared", "topic": "private"}
    assert isinstance(model.heads.private["topic"], PrivateEnsemble)
    path = tmp_path / "model.onnx"
    assert export_onnx(model, list(model.heads.tasks), MAX_LENGTH, path, "dynamo") == "dynamo"
    proto = onnx.load(str(path))
    unshare_gemm_weights(proto)
    weights = {i.name: len(i.dims) for i in proto.graph.initializer}
    by_name = {n.name: n for n in proto.graph.node}
    chosen = {v.name: set(int8_nodes(proto, v)) for v in INT8_VARIANTS}
    heads = {n for n in chosen["dynamic-all"] if by_name[n].input[1].startswith("heads.")}
    # The ensemble's last layer reads a weight the exporter folded and named (div_*): a head
    # node all the same, left fp32 by the variants that keep heads fp32.
    folded = {
        n
        for n in chosen["dynamic-all"]
        if weights[by_name[n].input[1]] == 2 and by_name[n].input[1].startswith("div")
    }
    assert heads and folded
    assert chosen["dynamic-encoder"] == chosen["dynamic-all"] - heads - folded
    ffn_out = chosen["dynamic-encoder"] - chosen["dynamic-encoder-ffn-out-fp32"]
    assert len(ffn_out) == 2  # one per block of the tiny 2-layer BERT
    assert all(weights.get(by_name[n].input[1]) == 2 for names in chosen.values() for n in names)
    stacked = [
        n.name
        for n in proto.graph.node
        if n.op_type == "MatMul" and weights.get(n.input[1]) == 3 and "private" in n.input[1]
    ]
    assert stacked and not set(stacked) & chosen["dynamic-all"]


def test_quantization_decision_gates_on_the_largest_task_drop():
    from pipeline.export import quantization_decision

    fp32 = {"a": 80.0, "b": 90.0}
    kept = quantization_decision(fp32, {"a": 79.5, "b": 91.0}, max_drop=0.5)
    assert kept.kept and kept.tasks["a"].drop == pytest.approx(0.5)
    assert kept.tasks["b"].drop == pytest.approx(-1.0)  # a gain is not a drop
    dropped = quantization_decision(fp32, {"a": 79.4, "b": 95.0}, max_drop=0.5)
    assert not dropped.kept  # one task losing 0.6 points is enough, whatever the average


def test_register_and_cli_export_create_new_versions(
    exported, run_dir, tmp_path, bentoml_home, reuse_graph
):
    import bentoml

    from pipeline.export import register_artifact

    tag1 = register_artifact(exported.artifact_dir, "polytask-tiny")
    model = bentoml.models.get(tag1)
    stored = Path(model.path)
    assert stored.is_relative_to(bentoml_home)
    assert (stored / "model.onnx").read_bytes() == (
        exported.artifact_dir / "model.onnx"
    ).read_bytes()
    assert ArtifactMetadata.read(stored).run_id == run_dir.name
    assert model.info.labels["run_id"] == run_dir.name
    assert model.info.metadata["tasks"] == TASKS

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        argv = ["export", str(run_dir), "--output", str(tmp_path / "a2"), "--name", "polytask-tiny"]
        assert main(argv) == 0
    stdout = out.getvalue()
    tag2 = stdout.split("model tag: ")[-1].strip()
    assert tag2.startswith("polytask-tiny:") and tag2 != tag1
    assert "parity: max abs diff" in stdout and f"artifact directory: {tmp_path / 'a2'}" in stdout
    assert bentoml.models.get(tag2).tag.version != model.tag.version
    assert {str(m.tag) for m in bentoml.models.list("polytask-tiny")} == {tag1, tag2}

    renamed = register_artifact(exported.artifact_dir, "other-name")
    assert ArtifactMetadata.read(Path(bentoml.models.get(renamed).path)).model_name == "other-name"


def test_model_names_are_checked_before_any_work(tmp_path):
    from pipeline.export import ExportError, check_model_name, default_model_name, export_run

    assert default_model_name("My_Exp.") == "polytask-my_exp"
    check_model_name(default_model_name("x" * 100))
    with pytest.raises(ExportError, match="lower-case"):
        check_model_name("Bad Name")
    with pytest.raises(ExportError, match="lower-case"):
        export_run(tmp_path, model_name="Bad Name")


def test_export_replaces_an_earlier_artifact_but_nothing_else(run_dir, tmp_path, reuse_graph):
    from pipeline.export import ExportError, export_run

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a polytask artifact"):
        export_run(run_dir, register=False, output_dir=other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    out = tmp_path / "art"
    first = export_run(run_dir, register=False, output_dir=out).metadata
    (out / "stale.txt").write_text("from an earlier export")
    second = export_run(run_dir, register=False, output_dir=out).metadata
    assert ArtifactMetadata.read(out) == second and second.run_id == first.run_id
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "notes"]  # no temp dirs left
    assert export_run(run_dir, register=False).artifact_dir == run_dir / "artifact"


def test_fix_io_names_restores_the_contract_names(exported):
    """Guard against exporters that ignore input/output names: positional renaming, wired
    through the nodes, so the graph still runs."""
    import onnx
    import onnxruntime as ort

    from pipeline.export import fix_io_names

    proto = onnx.load(str(exported.artifact_dir / "model.onnx"))
    fix_io_names(proto, ["ids", "mask"], ["out0", "out1"])  # what another exporter might do
    wanted = [f"logits_{t}" for t in TASKS]
    assert fix_io_names(proto, ["input_ids", "attention_mask"], wanted)
    assert not fix_io_names(proto, ["input_ids", "attention_mask"], wanted)
    session = ort.InferenceSession(proto.SerializeToString())
    ids = np.array([[2, 7, 3]], dtype=np.int64)
    out = session.run(wanted, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert [o.shape for o in out] == [(1, 2), (1, 3)]


def test_serving_graph_is_traced_and_falls_back_to_dynamo_on_failed_parity(
    exported, run_dir, tmp_path, monkeypatch, reuse_graph
):
    """The default graph comes from the TorchScript exporter (recorded in the parity report);
    a traced graph that fails parity is exported again with dynamo, which then passes."""
    import pipeline.export as export

    assert exported.metadata.parity.exporter == "torchscript"
    real = export.check_parity
    calls = []

    def first_fails(*args, **kwargs):
        report = real(*args, **kwargs)
        calls.append(report)
        return report.model_copy(update={"passed": len(calls) > 1})

    monkeypatch.setattr(export, "check_parity", first_fails)
    result = export.export_run(run_dir, register=False, output_dir=tmp_path / "fallback")
    assert len(calls) == 2
    assert result.metadata.parity.exporter == "dynamo" and result.metadata.parity.passed


def test_serving_graph_traces_eager_attention_and_restores_the_models(run_dir, tmp_path):
    """Export traces the encoder's eager attention (without the IsNaN guard that SDPA's
    export puts around the softmax), then gives the model back its own implementation."""
    import onnx

    from pipeline.export import export_onnx
    from pipeline.runs import load_run

    model = load_run(run_dir).model
    config = model.encoder.transformer.config
    config_before = config._attn_implementation
    assert config_before == "sdpa"  # what transformers loads by default on CPU
    path = tmp_path / "model.onnx"
    export_onnx(model, list(model.heads.tasks), MAX_LENGTH, path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Softmax" in ops and "IsNaN" not in ops
    assert model.encoder.transformer.config._attn_implementation == config_before
