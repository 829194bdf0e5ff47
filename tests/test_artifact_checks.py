"""The artifact check (`serving.runtime.load_checked`) refuses bad artifacts, naming the file and
the field, before promotion, the retraining gate or the service can serve them wrongly.

Each test damages a copy of the tiny exported artifact the way a hand edit, a bug in an
exporter or a broken copy would: metadata.json (strict types, finite and sane numbers, labels,
tasks and outputs that fit each other and the graph), tokenizer.json (ids the graph cannot
embed, a file that does not parse) and the files themselves (symbolic links).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from serving.artifact import ArtifactError, ArtifactMetadata
from serving.runtime import CPU, CUDA, ModelCheckError, Runtime, check_answers, load_checked


def copy_of(artifact: Path, out: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of `artifact` whose metadata.json went through `edit` (a dict, as JSON reads)."""
    shutil.copytree(artifact, out)
    if edit is not None:
        meta = json.loads((out / "metadata.json").read_text())
        edit(meta)
        (out / "metadata.json").write_text(json.dumps(meta))
    return out


def set_temperature(value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta["tasks"][0]["calibration"]["temperature"] = value

    return edit


# --------------------------------------------------------------------------- H1, L6: numbers
@pytest.mark.parametrize(
    ("value", "why"),
    [
        (float("inf"), "finite number"),  # json.dumps writes Infinity
        (float("nan"), "finite number"),
        (1e30, "less than or equal to 100"),  # every answer uniform
        (1e-300, "greater than or equal to 0.01"),  # the softmax overflows
        (0, "greater than or equal to 0.01"),
        ("2.0", "valid number"),  # a string is refused, not converted
    ],
    ids=["inf", "nan", "huge", "tiny", "zero", "string"],
)
def test_a_bad_temperature_is_refused_naming_file_and_field(tiny_artifact, tmp_path, value, why):
    bad = copy_of(tiny_artifact, tmp_path / "bad", set_temperature(value))
    with pytest.raises(ArtifactError, match=why) as caught:
        ArtifactMetadata.read(bad)
    message = str(caught.value)
    assert message.startswith(f"{bad / 'metadata.json'}: field tasks.0.calibration.temperature:")
    assert "pydantic.dev" not in message
    with pytest.raises(ModelCheckError, match=r"metadata.json: field tasks\.0\.calibration"):
        load_checked(bad, threads=1)


def test_json_overflowing_to_infinity_is_refused_anywhere(tiny_artifact, tmp_path):
    # 1e400 parses to inf; not only temperatures: every float of the metadata must be finite.
    def edit(meta: dict) -> None:
        meta["tasks"][1]["dev"]["accuracy"] = 12345.5  # a mark to overwrite below

    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    text = (bad / "metadata.json").read_text()
    (bad / "metadata.json").write_text(text.replace("12345.5", "1e400"))
    with pytest.raises(ArtifactError, match=r"field tasks\.1\.dev\.accuracy: .*finite"):
        ArtifactMetadata.read(bad)


def test_temperatures_inside_the_bounds_are_read_as_written(tiny_artifact, tmp_path):
    for value in (0.01, 4, 100.0):
        ok = copy_of(tiny_artifact, tmp_path / f"t{value}", set_temperature(value))
        assert ArtifactMetadata.read(ok).tasks[0].calibration.temperature == value


# --------------------------------------------------------------------------- H2: lengths
@pytest.mark.parametrize(
    ("field", "value"),
    [("max_length", 0), ("max_length", -5), ("max_length", 2), ("dim", 0)],
)
def test_an_encoder_without_room_for_text_is_refused(tiny_artifact, tmp_path, field, value):
    def edit(meta: dict) -> None:
        meta["encoder"][field] = value

    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    with pytest.raises(ArtifactError, match=rf"field encoder\.{field}: .*\(got {value}\)"):
        ArtifactMetadata.read(bad)


def test_max_length_must_match_the_tokenizers_truncation(tiny_artifact, tmp_path):
    def edit(meta: dict) -> None:
        meta["encoder"]["max_length"] = 8  # tokenizer.json truncates at 16

    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    with pytest.raises(ArtifactError, match="truncation max_length 16 differs from metadata.json"):
        Runtime(bad, threads=1)


# --------------------------------------------------------------------------- M2: tasks, labels
def _dup_task(meta: dict) -> None:
    meta["tasks"].append(dict(meta["tasks"][0]))


def _swap_outputs(meta: dict) -> None:
    first, second = meta["tasks"][0], meta["tasks"][1]
    first["output"], second["output"] = second["output"], first["output"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["tasks"][0].update(labels=["positive", "positive"]), r"tasks\.0: labels: "),
        (lambda m: m["tasks"][0].update(labels=["negative"]), r"tasks\.0\.labels: .*at least 2"),
        (lambda m: m["tasks"][0].update(labels=[]), r"tasks\.0\.labels: .*at least 2"),
        (_swap_outputs, r"tasks\.0: output: 'logits_topic', but task 'sentiment' is answered"),
        (_dup_task, r"tasks: \['sentiment'\] listed more than once"),
        (lambda m: m.update(tasks=[]), r"field tasks: .*at least 1"),
        (lambda m: m["tasks"][0].update(name="", output="logits_"), r"tasks\.0\.name: "),
    ],
    ids=[
        "labels-repeat",
        "one-label",
        "no-labels",
        "outputs-swapped",
        "task-twice",
        "no-tasks",
        "empty-name",
    ],
)
def test_tasks_labels_and_outputs_must_fit_each_other(tiny_artifact, tmp_path, edit, message):
    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    with pytest.raises(ArtifactError, match=message):
        ArtifactMetadata.read(bad)


@pytest.mark.parametrize(
    ("task", "labels", "index", "width"),
    [("sentiment", ["negative", "neutral", "positive"], 0, 2), ("topic", ["food", "sport"], 1, 3)],
    ids=["more-labels", "fewer-labels"],
)
def test_labels_must_match_the_width_of_the_graphs_output(
    tiny_artifact, tmp_path, task, labels, index, width
):
    def edit(meta: dict) -> None:
        meta["tasks"][index]["labels"] = labels

    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    expected = (
        rf"metadata.json: field tasks\.{index}\.labels: task {task} has {len(labels)} labels, "
        rf"but the model.onnx output logits_{task} gives {width} logits"
    )
    with pytest.raises(ArtifactError, match=expected):
        Runtime(bad, threads=1)
    with pytest.raises(ModelCheckError, match=expected):
        load_checked(bad, threads=1)


# --------------------------------------------------------------------------- M1: vocabulary
def _extend_vocabulary(artifact: Path, out: Path, word: str, token_id: int) -> Path:
    """A copy whose tokenizer.json maps `word` to `token_id`."""
    out = copy_of(artifact, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"][word] = token_id
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out


def test_token_ids_the_graph_cannot_embed_are_refused_at_load(tiny_artifact, tmp_path):
    # The tiny encoder's table has one row per word of its vocabulary (well under 500); the
    # known texts never say "zebra", so only the probe of the largest id finds this.
    bad = _extend_vocabulary(tiny_artifact, tmp_path / "bad", "zebra", 500)
    with pytest.raises(
        ModelCheckError, match="tokenizer.json has token ids up to 500 that model.onnx cannot embed"
    ):
        load_checked(bad, threads=1)


class _ZeroFillSession:
    """The CPU session behaving as onnxruntime's CUDA Gather does: an id beyond the embedding
    table gives a row of zeros instead of an error (here: the last row, equally silent)."""

    def __init__(self, session, rows: int) -> None:
        self._session, self._rows = session, rows

    def run(self, outputs, feeds):
        feeds = dict(feeds)
        feeds["input_ids"] = np.minimum(feeds["input_ids"], self._rows - 1)
        return self._session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_token_ids_beyond_the_table_are_refused_where_the_graph_does_not_fail(
    tiny_artifact, tmp_path
):
    rows = len(json.loads((tiny_artifact / "tokenizer.json").read_text())["model"]["vocab"])
    bad = _extend_vocabulary(tiny_artifact, tmp_path / "bad", "zebra", 500)
    runtime = Runtime(bad, threads=1, parallel=False)
    runtime.session = _ZeroFillSession(runtime.session, rows)
    runtime.providers = [CUDA, CPU]  # the edge we cannot reach here: a CUDA session
    with pytest.raises(ModelCheckError, match=f"embedding table has {rows} rows"):
        check_answers(runtime)


def test_the_largest_id_of_a_good_tokenizer_passes(tiny_artifact, tmp_path):
    rows = len(json.loads((tiny_artifact / "tokenizer.json").read_text())["model"]["vocab"])
    runtime = Runtime(tiny_artifact, threads=1, parallel=False)
    runtime.providers = [CUDA, CPU]  # also read the table's rows from the graph
    assert max(runtime.tokenizer.get_vocab(with_added_tokens=True).values()) == rows - 1
    check_answers(runtime)


# --------------------------------------------------------------------------- degenerate models
def test_a_model_that_answers_every_text_the_same_is_refused(tiny_artifact, tmp_path):
    # Every word unknown and texts cut to [CLS] [UNK] [SEP]: every known text reaches the
    # graph as the same three tokens (what max_length 0 or an infinite temperature did).
    def edit(meta: dict) -> None:
        meta["encoder"]["max_length"] = 3

    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    tokenizer = json.loads((bad / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokenizer["model"]["vocab"] = {w: i for w, i in vocab.items() if w.startswith("[")}
    tokenizer["truncation"]["max_length"] = 3
    (bad / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelCheckError, match="answers every known text the same"):
        load_checked(bad, threads=1)


def test_a_model_is_not_refused_for_one_task_answering_alike(tiny_artifact):
    runtime = Runtime(tiny_artifact, threads=1, parallel=False)
    runtime.temperatures["sentiment"] = 1e30  # uniform, whatever the text
    check_answers(runtime)
    runtime.temperatures["topic"] = 1e30
    with pytest.raises(ModelCheckError, match="answers every known text the same"):
        check_answers(runtime)


# --------------------------------------------------------------------------- L5: messages
def test_metadata_that_does_not_parse_is_named_with_its_line(tiny_artifact, tmp_path):
    bad = copy_of(tiny_artifact, tmp_path / "bad")
    (bad / "metadata.json").write_text('{\n "schema_version": 1,\n "model_name": ,\n}')
    with pytest.raises(ArtifactError) as caught:
        ArtifactMetadata.read(bad)
    assert str(caught.value).startswith(f"{bad / 'metadata.json'}: line 3 column 16: ")
    assert isinstance(caught.value, ValueError)


def test_every_field_at_fault_is_named_together(tiny_artifact, tmp_path):
    def edit(meta: dict) -> None:
        meta["encoder"]["max_length"] = 0
        meta["tasks"][1]["calibration"]["temperature"] = "2.0"

    bad = copy_of(tiny_artifact, tmp_path / "bad", edit)
    with pytest.raises(ArtifactError) as caught:
        ArtifactMetadata.read(bad)
    message = str(caught.value)
    assert "field encoder.max_length: " in message
    assert "field tasks.1.calibration.temperature: " in message


def test_a_tokenizer_that_does_not_parse_is_named(tiny_artifact, tmp_path):
    bad = copy_of(tiny_artifact, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("not json")
    with pytest.raises(ArtifactError, match=f"^{bad / 'tokenizer.json'}: not a tokenizer: "):
        Runtime(bad, threads=1)
    with pytest.raises(ModelCheckError, match="cannot be loaded: .*tokenizer.json: not a"):
        load_checked(bad, threads=1)


# --------------------------------------------------------------------------- M5: own files
@pytest.mark.parametrize("name", ["metadata.json", "model.onnx", "tokenizer.json"])
def test_a_file_linked_from_outside_the_artifact_is_refused(tiny_artifact, tmp_path, name):
    bad = copy_of(tiny_artifact, tmp_path / "bad")
    (bad / name).unlink()
    os.symlink(tiny_artifact / name, bad / name)  # a good file, but not the artifact's own
    with pytest.raises(ArtifactError, match=f"{bad / name}: is a symbolic link"):
        Runtime(bad, threads=1)
    with pytest.raises(ModelCheckError, match="is a symbolic link"):
        load_checked(bad, threads=1)


def test_a_file_that_is_not_a_regular_file_is_refused(tiny_artifact, tmp_path):
    bad = copy_of(tiny_artifact, tmp_path / "bad")
    (bad / "model.onnx").unlink()
    (bad / "model.onnx").mkdir()
    with pytest.raises(ArtifactError, match="model.onnx: not a regular file"):
        Runtime(bad, threads=1)


def test_the_tiny_artifact_passes_every_check(tiny_artifact):
    runtime = load_checked(tiny_artifact, threads=1)
    assert runtime.task_names == ["sentiment", "topic"]


# --------------------------------------------------------------------------- special tokens
def test_special_tokens_in_a_text_are_text_in_serving_and_training(tiny_artifact, tiny_encoder_dir):
    """A client's "[SEP]" or "[PAD]" must not become the separator or padding inside a
    sentence; training tokenizes it the same way, so served and trained inputs agree."""
    from pipeline.features import load_tokenizer

    runtime = Runtime(tiny_artifact, parallel=False)
    text = "good [SEP] bad [PAD] [CLS]"
    ids = runtime.tokenizer.encode(text).ids
    special = {runtime.tokenizer.token_to_id(t) for t in ("[SEP]", "[PAD]", "[CLS]")}
    assert ids[0] in special and ids[-1] in special  # the template's own [CLS] ... [SEP]
    assert not special & set(ids[1:-1]), ids
    assert load_tokenizer(str(tiny_encoder_dir))(text)["input_ids"] == ids


def _top_label_map(ys: list[float]) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        cal = meta["tasks"][0]["calibration"]
        cal["method"] = "temperature+isotonic"
        cal["knots_x"] = [0.5, 0.7, 0.9, 1.0][: len(ys)]
        cal["knots_y"] = ys

    return edit


def test_a_top_label_map_that_never_reaches_chance_is_refused(tiny_artifact, tmp_path):
    # Review L6: all-zero knots pinned every answer's probability at about 0.5.
    labels = ArtifactMetadata.read(tiny_artifact).tasks[0].labels
    assert len(labels) == 2
    bad = copy_of(tiny_artifact, tmp_path / "zero", _top_label_map([0.0, 0.0, 0.0]))
    with pytest.raises(ArtifactError, match=r"calibration.knots_y: every value is below chance"):
        ArtifactMetadata.read(bad)
    # A flat map (a one-block isotonic fit, at the head's accuracy) is a valid map.
    flat = copy_of(tiny_artifact, tmp_path / "flat", _top_label_map([0.8, 0.8]))
    assert ArtifactMetadata.read(flat).tasks[0].calibration.knots_y == [0.8, 0.8]
    rising = copy_of(tiny_artifact, tmp_path / "rising", _top_label_map([0.3, 0.6, 0.9]))
    assert ArtifactMetadata.read(rising).tasks[0].calibration.knots_y == [0.3, 0.6, 0.9]
