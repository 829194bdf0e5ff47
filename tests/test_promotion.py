"""Promotion can't brick serving (serving/model_store.py, `polytask models`), on a tiny exported
model copied into an isolated BentoML store. Claims checked: a truncated model.onnx, or a model
that answers NaN, is refused by `polytask models promote` with the reason (exit 2) and nothing
changes, and the retraining gate's evaluation refuses it too; a damaged last line of promotions.jsonl makes `rollback` name `file:line`, and the
next promotion goes on a line of its own; promote/rollback from several processes at once
never fail and leave valid JSONL and one promoted version; the fallback order is the last
promoted versions first; HTTP-facing messages carry no filesystem paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config_dict, train_tiny_run, use_bentoml_home
from test_serving import REPO, register_copy

NAME = "polytask-tiny"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    """A tiny run exported to an artifact directory (not registered)."""
    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("promotion-run")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    return export_run(run_dir, register=False, output_dir=tmp / "artifact").artifact_dir


def truncated_copy(artifact: Path, out: Path) -> Path:
    """`artifact` with model.onnx cut to half its bytes (an interrupted copy)."""
    shutil.copytree(artifact, out)
    data = (out / "model.onnx").read_bytes()
    (out / "model.onnx").write_bytes(data[: len(data) // 2])
    return out


def nan_copy(artifact: Path, out: Path) -> Path:
    """`artifact` whose `topic` weights (its tower, or its private head when routing chose
    that path) are NaN: it loads, but answers NaN."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    shutil.copytree(artifact, out)
    proto = onnx.load(str(out / "model.onnx"))
    hit = [
        i
        for i in proto.graph.initializer
        if "topic" in i.name and ("towers" in i.name or "private" in i.name)
    ]
    assert hit, [i.name for i in proto.graph.initializer]
    for init in hit:
        weights = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(np.full_like(weights, np.nan), init.name))
    onnx.save(proto, str(out / "model.onnx"))
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    with use_bentoml_home(tmp_path / "bentoml") as home:
        yield home


def _stage(tag: str) -> str | None:
    import bentoml

    return bentoml.models.get(tag).info.labels.get("stage")


def _history_lines(home: Path) -> list[bytes]:
    return (home / "polytask" / "promotions.jsonl").read_bytes().split(b"\n")


# --------------------------------------------------------------------------- broken models
@pytest.mark.parametrize(
    ("damage", "reason"),
    [(truncated_copy, "cannot be loaded"), (nan_copy, "non-finite outputs")],
    ids=["truncated", "nan"],
)
def test_promoting_a_broken_model_exits_2_with_the_reason(
    artifact, store, tmp_path, capsys, damage, reason
):
    from pipeline.cli import main
    from pipeline.jobs.models import read_history
    from serving.model_store import resolve_model

    good = register_copy(artifact, NAME)
    assert main(["models", "promote", good]) == 0
    broken = register_copy(damage(artifact, tmp_path / "broken"), NAME)
    capsys.readouterr()

    assert main(["models", "promote", broken]) == 2
    err = capsys.readouterr().err
    assert f"{broken}: refused, the model is broken" in err and reason in err, err
    if damage is truncated_copy:
        assert "INVALID_PROTOBUF" in err or "Protobuf parsing failed" in err, err
    # nothing changed: the good model stays promoted, and a restarted service would load it
    assert resolve_model(name=NAME).tag == good
    assert _stage(broken) is None and _stage(good) == "production"
    assert [e.tag for e in read_history(NAME)] == [good]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(truncated_copy, "cannot be loaded: InvalidProtobuf"), (nan_copy, "non-finite outputs")],
    ids=["truncated", "nan"],
)
def test_the_retraining_gate_refuses_a_broken_artifact(
    artifact, tmp_path, tiny_data_dir, tiny_encoder_dir, damage, reason
):
    from pipeline.config import parse_config
    from pipeline.jobs.retrain import evaluate_artifact
    from serving.runtime import ModelCheckError

    config = parse_config(
        tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    )
    assert set(evaluate_artifact(artifact, config)["tasks"]) == {"sentiment", "topic"}
    with pytest.raises(ModelCheckError, match=reason):
        evaluate_artifact(damage(artifact, tmp_path / "broken"), config)


def test_rollback_refuses_a_broken_previous_model(artifact, store, tmp_path):
    from pipeline.jobs.models import PromotionError, promote, rollback

    first = register_copy(artifact, NAME)
    promote(first)
    # The previous promotion's files were damaged since (the store is a shared volume).
    (_model_path(first) / "model.onnx").write_bytes(b"not a model")
    second = register_copy(artifact, NAME)
    promote(second)
    with pytest.raises(PromotionError, match=f"{first}: refused, the model is broken"):
        rollback(NAME)
    assert _stage(second) == "production" and _stage(first) is None


def _model_path(tag: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(tag).path)


# --------------------------------------------------------------------------- history
def test_damaged_last_history_line_is_named_and_never_appended_onto(
    artifact, store, capsys, caplog
):
    from pipeline.cli import main
    from serving.model_store import fallback_candidates, read_history

    first, second = register_copy(artifact, NAME), register_copy(artifact, NAME)
    assert main(["models", "promote", first]) == 0
    assert main(["models", "promote", second]) == 0
    path = store / "polytask" / "promotions.jsonl"
    # An interrupted append (what the old, unlocked writer could leave): last line cut short.
    path.write_bytes(path.read_bytes()[:-25])
    damaged = path.read_bytes().split(b"\n")[1]
    capsys.readouterr()

    assert main(["models", "rollback", "--name", NAME]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: damaged promotion record (not valid JSON" in err, err
    assert "fix or delete that line" in err

    # The next promotion succeeds, warns, and goes on a line of its own.
    assert main(["models", "promote", first]) == 0
    assert f"{path}:2: damaged promotion record" in caplog.text
    lines = _history_lines(store)
    assert lines[1] == damaged and lines[-1] == b""
    assert json.loads(lines[0])["tag"] == first and json.loads(lines[2])["tag"] == first
    assert len(lines) == 4
    # The service's reader skips the damaged line; rollback still points at it.
    assert [e.tag for e in read_history(NAME, strict=False)] == [first, first]
    assert [c.tag for c in fallback_candidates(NAME)] == [first, second]
    assert main(["models", "rollback", "--name", NAME]) == 2
    assert f"{path}:2:" in capsys.readouterr().err


def test_history_lines_that_are_json_but_not_records_are_named(artifact, store):
    from serving.model_store import HistoryError, promote, read_history

    promote(register_copy(artifact, NAME))
    path = store / "polytask" / "promotions.jsonl"
    with path.open("ab") as f:
        f.write(b'["a list"]\n{"name": "x"}\n')
    with pytest.raises(HistoryError, match=r"promotions.jsonl:2: .*not a JSON object"):
        read_history()
    path.write_bytes(path.read_bytes().replace(b'["a list"]\n', b""))
    with pytest.raises(HistoryError, match=r"promotions.jsonl:2: .*missing or non-string tag"):
        read_history()


WRITER = """
import random, sys, time
from serving.model_store import promote, rollback
seed, start, tags = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
rng = random.Random(seed)
while time.time() < start:  # all writers begin together, after their imports
    time.sleep(0.01)
for i in range(4):
    if i % 2:
        rollback(tags[0].split(":")[0])
    else:
        promote(rng.choice(tags), by="promote", reason=f"process {seed}")
"""

# Reads what the service and `models list` read, as fast as it can, until told to stop.
READER = """
import glob, json, os, sys, yaml
home, stop = sys.argv[1], sys.argv[2]
reads, bad = 0, []
while not os.path.exists(stop):
    for path in glob.glob(f"{home}/models/*/*/model.yaml"):
        reads += 1
        if not isinstance(yaml.safe_load(open(path).read()), dict):
            bad.append(path)
    history = f"{home}/polytask/promotions.jsonl"
    if os.path.exists(history):
        reads += 1
        for line in open(history, "rb").read().split(b"\\n"):
            if line:
                try:
                    json.loads(line)
                except ValueError:
                    bad.append(history)
print(json.dumps({"reads": reads, "bad": bad[:5]}))
"""


def test_concurrent_promote_and_rollback_from_several_processes(artifact, store, tmp_path):
    """4 processes x 4 operations at once, and a reader: every operation succeeds, the reader
    never sees a half-written model.yaml or history line, one version ends up promoted, and the
    history is 3 + 16 valid JSON lines, the last one being the promoted version."""
    import os
    import time

    import bentoml

    from serving.model_store import promote, promoted_tag, read_history

    tags = [register_copy(artifact, NAME) for _ in range(3)]
    for tag in tags:
        promote(tag)
    env = {**os.environ, "BENTOML_HOME": str(store), "PYTHONPATH": str(REPO)}
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(store), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    start = time.time() + 15
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(seed), str(start), *tags],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in range(4)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in writers]
    stop.touch()
    seen = json.loads(reader.communicate(timeout=60)[0].strip().splitlines()[-1])
    for proc, out in zip(writers, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    assert seen["reads"] > 0 and seen["bad"] == [], seen

    lines = [ln for ln in _history_lines(store) if ln]
    assert len(lines) == 3 + 4 * 4
    assert all(isinstance(json.loads(ln), dict) for ln in lines)
    assert len(read_history(NAME)) == len(lines)
    promoted = [str(m.tag) for m in bentoml.models.list(NAME) if m.info.labels.get("stage")]
    assert promoted == [promoted_tag(NAME)]
    assert promoted[0] == read_history(NAME)[-1].tag  # the last recorded is what is promoted
    leftovers = list(store.rglob("*.tmp"))
    assert not leftovers, leftovers


# --------------------------------------------------------------------------- fallback
def test_fallback_order_is_last_promoted_first_then_newest(artifact, store, tmp_path):
    from serving.model_store import fallback_candidates, promote

    a, b = register_copy(artifact, NAME), register_copy(artifact, NAME)
    promote(a)
    promote(b)
    promote(a)
    c = register_copy(artifact, NAME)  # never promoted, newest
    d = register_copy(truncated_copy(artifact, tmp_path / "broken"), NAME)
    got = fallback_candidates(NAME, exclude={d})
    assert [m.tag for m in got] == [a, b, c]
    assert {m.source for m in got} == {"fallback"}
    assert all((m.path / "model.onnx").is_file() for m in got)


def test_http_messages_carry_no_paths(tmp_path):
    from serving.model_store import redact_paths

    model_dir = tmp_path / "bentoml" / "models" / NAME / "abc"
    onnx_error = (
        f"[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from {model_dir}/model.onnx "
        "failed:Protobuf parsing failed."
    )
    got = redact_paths(onnx_error, {str(model_dir): f"{NAME}:abc"})
    assert got.endswith(f"Load model from {NAME}:abc/model.onnx failed:Protobuf parsing failed.")
    assert redact_paths(f"{tmp_path}/x: artifact has no model.onnx") == (
        "<path>: artifact has no model.onnx"
    )
    assert str(tmp_path) not in redact_paths(f"no model named 'm' in the model store {tmp_path}")
    kept = "see http://127.0.0.1:3000/readyz; 3 texts/s, a / b"
    assert redact_paths(kept) == kept
