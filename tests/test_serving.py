"""Serving without a server: the runtime on a tiny exported artifact (answers equal
onnxruntime's, truncation flagged, task subsets, unknown tasks named), request validation (each
bad input rejected with a message naming it), model store resolution (pinned > promoted >
latest), ORT settings, and no torch anywhere in serving/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ort_logits, train_tiny_run, use_bentoml_home

from serving.schemas import RequestError, parse_predict_request

TASKS = ["sentiment", "topic"]
MAX_LENGTH = 16  # tiny_config_dict's encoder.max_length
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- shared helpers
def register_copy(artifact: Path, name: str, labels: dict[str, str] | None = None) -> str:
    """Register `artifact` under `name` with extra labels (e.g. the promotion label)."""
    import shutil

    import bentoml

    with bentoml.models.create(name, labels=labels or {}) as model:
        shutil.copytree(artifact, model.path, dirs_exist_ok=True)
    return str(model.tag)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    """A tiny run exported to an artifact directory (not registered)."""
    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("serving-run")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    return export_run(run_dir, register=False, output_dir=tmp / "artifact").artifact_dir


@pytest.fixture(scope="module")
def runtime(artifact):
    from serving.runtime import Runtime

    return Runtime(artifact, version="tiny:v1", threads=1)


def _ort_probabilities(artifact: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Reference: tokenizers + onnxruntime directly, one unsorted batch, numpy softmax of the
    logits divided by the task's temperature (metadata.json)."""
    from serving.artifact import ArtifactMetadata

    temperatures = {
        t.name: t.calibration.temperature if t.calibration else 1.0
        for t in ArtifactMetadata.read(artifact).tasks
    }
    out = {}
    for task, z in ort_logits(artifact, texts, TASKS).items():
        z = z / temperatures[task]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out[task] = e / e.sum(axis=1, keepdims=True)
    return out


# --------------------------------------------------------------------------- runtime
TEXTS = [
    "good great film",
    "the pizza was awful and the soup dull",
    "computer",
    "it was a very nice match with the team and the coach of the league",
]


def test_predictions_equal_onnxruntime_direct(runtime, artifact):
    want = _ort_probabilities(artifact, TEXTS)
    pred = runtime.predict(TEXTS, return_all=True)
    assert pred.model_version == "tiny:v1"
    assert len(pred.results) == len(TEXTS)
    for i, result in enumerate(pred.results):
        assert list(result.tasks) == TASKS
        for task in TASKS:
            answer = result.tasks[task]
            labels = runtime.labels[task]
            assert answer.label == labels[int(want[task][i].argmax())]
            assert answer.probability == pytest.approx(float(want[task][i].max()), abs=1e-5)
            probs = [answer.probabilities[lab] for lab in labels]
            np.testing.assert_allclose(probs, want[task][i], atol=1e-5)
            assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_answers_do_not_depend_on_batch_composition(runtime):
    """Length buckets and padding must not change a text's answer."""
    alone = [runtime.run([t]).probabilities for t in TEXTS]
    together = runtime.run(TEXTS).probabilities
    for i in range(len(TEXTS)):
        for task in TASKS:
            np.testing.assert_allclose(together[task][i], alone[i][task][0], atol=1e-5)


def test_length_buckets_skip_padding_and_keep_every_answer(runtime, artifact):
    """Short and long texts mixed: the runtime splits them into length buckets, computes far
    fewer padded positions than one batch padded to the longest, and every answer equals the
    unbucketed reference (one batch, tokenizers + onnxruntime directly)."""
    short = ["good", "bad film", "pizza", "the coach", "awful", "nice", "dull soup", "team"]
    long = [" ".join(["good great film with the team"] * 3) + f" {i}" for i in range(8)]
    texts = [t for pair in zip(short, long, strict=True) for t in pair]
    out = runtime.run(texts)
    one_batch = len(texts) * MAX_LENGTH - out.tokens  # every long text fills max_length
    assert out.runs >= 2
    assert out.padded_tokens < one_batch / 4
    ref = _ort_probabilities(artifact, texts)
    for task in TASKS:
        np.testing.assert_allclose(out.probabilities[task], ref[task], atol=1e-5)


def test_long_texts_are_truncated_and_flagged(runtime):
    long = " ".join(["good"] * (3 * MAX_LENGTH))
    pred = runtime.predict(["good film", long])
    assert [r.truncated for r in pred.results] == [False, True]
    # Truncated to max_length tokens: the same answer as its first max_length - 2 words.
    cut = " ".join(["good"] * (MAX_LENGTH - 2))
    same = runtime.run([cut]).probabilities
    full = runtime.run([long]).probabilities
    for task in TASKS:
        np.testing.assert_allclose(full[task][0], same[task][0], atol=1e-5)


def test_subset_of_tasks_and_unknown_task(runtime):
    from serving.runtime import UnknownTaskError

    pred = runtime.predict(["good film"], tasks=["topic"])
    assert list(pred.results[0].tasks) == ["topic"]
    assert pred.results[0].tasks["topic"].probabilities is None
    with pytest.raises(UnknownTaskError, match=r"\['nope'\].*\['sentiment', 'topic'\]"):
        runtime.predict(["good film"], tasks=["topic", "nope"])


def test_describe_lists_tasks_and_labels(runtime):
    info = runtime.describe()
    assert info["model_version"] == "tiny:v1"
    assert info["max_length"] == MAX_LENGTH
    assert info["tasks"]["sentiment"]["labels"] == ["negative", "positive"]
    assert info["tasks"]["topic"]["labels"] == ["food", "sport", "tech"]


def test_choose_providers_and_threads():
    from serving.runtime import choose_providers, ort_threads

    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert choose_providers("auto", [cpu]) == [cpu]
    assert choose_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert choose_providers("cuda", [cuda, cpu]) == [cuda, cpu]
    assert choose_providers("cpu", [cuda, cpu]) == [cpu]
    assert choose_providers("cuda", [cpu]) == [cpu]  # falls back, with a warning
    with pytest.raises(ValueError, match="POLYTASK_ORT_DEVICE"):
        choose_providers("tpu", [cpu])
    assert ort_threads({"POLYTASK_ORT_THREADS": "3"}) == 3
    assert ort_threads({}) >= 1
    with pytest.raises(ValueError, match="POLYTASK_ORT_THREADS"):
        ort_threads({"POLYTASK_ORT_THREADS": "0"})


def test_serving_imports_no_torch():
    code = (
        "import sys\n"
        "import serving.runtime, serving.schemas, serving.model_store, serving.metrics\n"
        "import serving.service\n"
        "bad = [m for m in ('torch', 'transformers', 'pipeline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- request validation
def _rejected(body: object, limit: int = 4) -> RequestError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError) as info:
        parse_predict_request(raw, limit=limit)
    return info.value


@pytest.mark.parametrize(
    ("body", "status", "reason", "message"),
    [
        (b'{"texts": ["a"', 400, "malformed_json", "malformed JSON"),
        (b"", 400, "malformed_json", "malformed JSON"),
        (["a"], 422, "not_an_object", "JSON object"),
        ({}, 422, "missing_texts", "texts: required"),
        ({"tasks": ["mr"]}, 422, "missing_texts", "texts: required"),
        ({"texts": []}, 422, "empty_list", "texts: the list is empty"),
        ({"texts": ["ok", "  "]}, 422, "empty_text", r"texts\[1\]: empty"),
        ({"texts": [""]}, 422, "empty_text", r"texts\[0\]: empty"),
        ({"texts": ["ok", 3]}, 422, "non_string_text", "texts.1"),
        ({"texts": [None]}, 422, "non_string_text", "texts.0"),
        ({"texts": "just one"}, 422, "texts_not_a_list", "texts"),
        ({"texts": ["a"] * 5}, 422, "too_many_texts", "5 texts; at most 4"),
        ({"texts": ["a"], "tasks": []}, 422, "empty_tasks", "tasks: the list is empty"),
        ({"texts": ["a"], "tasks": [1]}, 422, "invalid_tasks", "tasks.0"),
        ({"texts": ["a"], "colour": "red"}, 422, "unknown_field", "colour"),
    ],
)
def test_bad_requests_are_rejected_with_a_message(body, status, reason, message):
    err = _rejected(body)
    assert (err.status, err.reason) == (status, reason)
    assert err.body() == {"error": err.message, "reason": reason}
    assert re.search(message, err.message), err.message


def test_valid_request_and_env_limit(monkeypatch):
    req = parse_predict_request(b'{"texts": ["a b"], "return_all_probabilities": true}')
    assert req.texts == ["a b"] and req.tasks is None and req.return_all_probabilities
    from serving.settings import get_settings

    monkeypatch.setenv("POLYTASK_MAX_TEXTS", "2")
    get_settings.cache_clear()  # the service reads its settings once, at start
    try:
        assert _rejected({"texts": ["a", "b", "c"]}, limit=None).reason == "too_many_texts"
    finally:
        monkeypatch.delenv("POLYTASK_MAX_TEXTS")
        get_settings.cache_clear()
    parse_predict_request(json.dumps({"texts": ["a"] * 64}).encode(), limit=64)


def test_openapi_schema_has_examples():
    from serving.service import openapi_schema

    spec = openapi_schema()
    schemas = spec["components"]["schemas"]
    assert schemas["PredictRequest"]["examples"][0]["texts"]
    assert schemas["PredictResponse"]["examples"][0]["model_version"]
    assert set(spec["paths"]) == {"/predict", "/tasks"}
    assert "422" in spec["paths"]["/predict"]["post"]["responses"]


# --------------------------------------------------------------------------- model store
def test_model_store_resolution_order(artifact, tmp_path, monkeypatch):
    from serving.model_store import ModelNotFoundError, promote, resolve_model

    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    monkeypatch.delenv("POLYTASK_MODEL_NAME", raising=False)
    with use_bentoml_home(tmp_path / "bentoml"):
        with pytest.raises(ModelNotFoundError, match="no model named 'polytask-senteval6'"):
            resolve_model()
        first = register_copy(artifact, "polytask-senteval6")
        second = register_copy(artifact, "polytask-senteval6")
        other = register_copy(artifact, "other-model")
        # latest
        got = resolve_model()
        assert (got.tag, got.source) == (second, "latest")
        assert (got.path / "model.onnx").is_file()
        # promoted wins over latest, even when older
        assert promote(first) == first
        got = resolve_model()
        assert (got.tag, got.source) == (first, "promoted")
        third = register_copy(artifact, "polytask-senteval6")
        assert resolve_model().tag == first
        # promoting another version takes the label off the first
        promote(third)
        assert resolve_model().tag == third
        import bentoml

        assert "stage" not in bentoml.models.get(first).info.labels
        # the model name comes from POLYTASK_MODEL_NAME
        monkeypatch.setenv("POLYTASK_MODEL_NAME", "other-model")
        assert resolve_model().tag == other
        # a pinned tag wins over everything
        monkeypatch.setenv("POLYTASK_MODEL", second)
        got = resolve_model()
        assert (got.tag, got.source) == (second, "pinned")
        assert resolve_model(tag="polytask-senteval6").tag == third  # name = latest version
        monkeypatch.setenv("POLYTASK_MODEL", "polytask-senteval6:nosuchversion")
        with pytest.raises(ModelNotFoundError, match="nosuchversion"):
            resolve_model()


# --------------------------------------------------------------------------- CLI and metrics
def test_cli_predict_prints_every_task_from_the_store(artifact, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    monkeypatch.setenv("POLYTASK_MODEL_NAME", "polytask-tiny")
    with use_bentoml_home(tmp_path / "bentoml"):
        assert main(["predict", "good great film"]) == 2  # empty store: a message, status 2
        assert "no model named 'polytask-tiny'" in capsys.readouterr().err
        tag = register_copy(artifact, "polytask-tiny")
        long = " ".join(["pizza"] * 40)
        assert main(["predict", "good great film", long, "--model", tag]) == 0
    out = capsys.readouterr().out
    assert f"model: {tag}" in out
    blocks = out.split("\n\n")[1:]
    assert len(blocks) == 2 and "(truncated)" in blocks[1] and "(truncated)" not in blocks[0]
    for block in blocks:
        # a probability with 3 decimals (1.000 once rounded, with a temperature below 1)
        assert re.search(r"sentiment\s+(negative|positive)\s+[01]\.\d{3}", block)
        assert re.search(r"topic\s+(food|sport|tech)\s+[01]\.\d{3}", block)


def test_metrics_record_answers_by_task_and_label():
    from prometheus_client import REGISTRY

    from serving.metrics import get_metrics

    metrics = get_metrics()
    assert get_metrics() is metrics  # created once per process

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("polytask_predictions_total", task="t-unit", label="b")
    metrics.record_answers("t-unit", ["a", "b", "b"], [0.9, 0.6, 0.7])
    assert value("polytask_predictions_total", task="t-unit", label="b") - before == 2
    assert value("polytask_prediction_confidence_count", task="t-unit") >= 3
    assert value("polytask_prediction_confidence_bucket", task="t-unit", le="0.6") >= 1
    metrics.set_active_version("v2", previous="v1")
    assert value("polytask_model_active", version="v2") == 1
    assert REGISTRY.get_sample_value("polytask_model_active", {"version": "v1"}) is None


def test_freezing_startup_objects_still_frees_a_swapped_out_model():
    """`freeze_startup_objects` keeps start-up objects out of full collections, and, called
    again after a swap, lets the old model (a reference cycle, as Runtime and its scheduler
    are) be collected instead of staying frozen for good."""
    import gc
    import weakref

    from serving.service import freeze_startup_objects

    class Model:
        """Stands for a served model: any object that can sit in a reference cycle."""

    try:
        model = Model()
        model.me = model  # a cycle: only the cyclic collector can free it
        ref = weakref.ref(model)
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        del model
        gc.collect()
        assert ref() is not None  # frozen: a full collection does not look at it
        freeze_startup_objects()  # what the Encoder does after a swap
        assert ref() is None
    finally:
        gc.unfreeze()
