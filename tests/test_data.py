"""Task data: every problem is reported with its file and line, all together; label vocabularies
are stable; statistics and fingerprints describe the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_task_rows, write_jsonl

from pipeline.config import TaskConfig, parse_config
from pipeline.data import (
    MAX_ERRORS_PER_FILE,
    DataError,
    fingerprint_files,
    format_stats,
    load_task,
    load_tasks,
    read_rows,
)


def _lines(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _row(text: str, label: object) -> str:
    return json.dumps({"text": text, "label": label})


def _task(tmp_path: Path, name: str = "t", train=(), dev=(), **task: object) -> TaskConfig:
    """A jsonl task under tmp_path/<name>/ with the given train and dev lines."""
    _lines(tmp_path / name / "train.jsonl", *train)
    _lines(tmp_path / name / "dev.jsonl", *dev)
    return TaskConfig(name=name, **task)


def _data_errors(task: TaskConfig, root: Path) -> list[str]:
    with pytest.raises(DataError) as info:
        load_task(task, root)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


GOOD_TRAIN = (_row("good film", "pos"), _row("bad film", "neg"))


def test_loads_texts_and_integer_labels(tmp_path):
    task = _task(tmp_path, train=GOOD_TRAIN + (_row("fine", "pos"),), dev=GOOD_TRAIN)
    data = load_task(task, tmp_path)
    assert data.labels == ["neg", "pos"]
    train = data.splits["train"]
    assert train.texts == ["good film", "bad film", "fine"]
    assert train.labels.dtype == np.int64
    assert train.labels.tolist() == [1, 0, 1]
    assert train.path == tmp_path / "t" / "train.jsonl"
    assert len(data.splits["dev"]) == 2
    assert data.num_classes == 2


def test_missing_file(tmp_path):
    (tmp_path / "t").mkdir()
    _lines(tmp_path / "t" / "train.jsonl", *GOOD_TRAIN)
    errors = _data_errors(TaskConfig(name="t"), tmp_path)
    assert errors == [f"{tmp_path / 't' / 'dev.jsonl'}: file not found"]


def test_missing_field_in_jsonl(tmp_path):
    task = _task(
        tmp_path, train=(*GOOD_TRAIN, json.dumps({"text": "x", "y": "pos"})), dev=GOOD_TRAIN
    )
    [error] = _data_errors(task, tmp_path)
    assert error.startswith(f"{tmp_path / 't' / 'train.jsonl'}:3: missing field 'label'")
    assert "fields present: ['text', 'y']" in error


def test_configured_field_names_are_used(tmp_path):
    rows = (json.dumps({"sentence": "a b", "y": 0}), json.dumps({"sentence": "c d", "y": 1}))
    task = _task(tmp_path, train=rows, dev=rows, text_field="sentence", label_field="y")
    data = load_task(task, tmp_path)
    assert data.splits["train"].texts == ["a b", "c d"]
    assert data.labels == ["0", "1"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    task = _task(tmp_path, train=GOOD_TRAIN, dev=(*GOOD_TRAIN, "", '{"text": "x", "label"'))
    [error] = _data_errors(task, tmp_path)
    # Blank lines are skipped but still counted: the bad line is the 4th of the file.
    assert error.startswith(f"{tmp_path / 't' / 'dev.jsonl'}:4: invalid JSON:")


def test_malformed_json_reports_the_real_column(tmp_path):
    path = _lines(tmp_path / "a.jsonl", '{"text": "b"')
    _, errors = read_rows(path, "jsonl", "text", "label")
    assert errors == [f"{path}:1: invalid JSON: Expecting ',' delimiter (column 13)"]


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("3", "int")])
def test_non_object_json_line(tmp_path, line, kind):
    task = _task(tmp_path, train=(line, *GOOD_TRAIN), dev=GOOD_TRAIN)
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'train.jsonl'}:1: expected a JSON object, got {kind}"
    ]


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_text(tmp_path, text):
    task = _task(tmp_path, train=GOOD_TRAIN, dev=(_row(text, "pos"), *GOOD_TRAIN))
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'dev.jsonl'}:1: field 'text' is empty"
    ]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (True, "field 'label' must be a string or integer, got True"),
        (1.5, "field 'label' must be a string or integer, got 1.5"),
        (None, "field 'label' must be a string or integer, got None"),
        (" ", "field 'label' is empty"),
    ],
)
def test_bad_label_values(tmp_path, label, message):
    task = _task(tmp_path, train=(*GOOD_TRAIN, _row("x", label)), dev=GOOD_TRAIN)
    assert _data_errors(task, tmp_path) == [f"{tmp_path / 't' / 'train.jsonl'}:3: {message}"]


def test_non_string_text(tmp_path):
    task = _task(tmp_path, train=(*GOOD_TRAIN, _row(42, "pos")), dev=GOOD_TRAIN)
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'train.jsonl'}:3: field 'text' must be a string, got int"
    ]


@pytest.mark.parametrize("lines", [(), ("", "  ")], ids=["empty", "blank-lines"])
def test_file_without_rows_is_an_empty_task(tmp_path, lines):
    task = _task(tmp_path, train=GOOD_TRAIN, dev=lines)
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'dev.jsonl'}: no examples (task 't', split 'dev')"
    ]


def test_all_bad_lines_of_a_file_are_reported_up_to_a_limit(tmp_path):
    bad = ["{"] * (MAX_ERRORS_PER_FILE + 3)
    task = _task(tmp_path, train=(*GOOD_TRAIN, *bad), dev=GOOD_TRAIN)
    errors = _data_errors(task, tmp_path)
    path = tmp_path / "t" / "train.jsonl"
    assert len(errors) == MAX_ERRORS_PER_FILE + 1
    assert errors[0].startswith(f"{path}:3: invalid JSON")
    assert errors[-1] == f"{path}: ... and 3 more bad lines"


def test_dev_label_unseen_in_train_is_named(tmp_path):
    task = _task(tmp_path, train=GOOD_TRAIN, dev=(*GOOD_TRAIN, _row("meh", "neutral")))
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'dev.jsonl'}:3: label 'neutral' is not among the training labels "
        "['neg', 'pos']"
    ]


def test_label_outside_declared_list(tmp_path):
    task = _task(
        tmp_path,
        train=(*GOOD_TRAIN, _row("so so", "mixed")),
        dev=GOOD_TRAIN,
        labels=["pos", "neg"],
    )
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'train.jsonl'}:3: label 'mixed' is not among the declared labels "
        "['pos', 'neg']"
    ]


def test_single_training_label_is_an_error(tmp_path):
    task = _task(tmp_path, train=(_row("a", "pos"),), dev=(_row("b", "pos"),))
    assert _data_errors(task, tmp_path) == [
        f"{tmp_path / 't' / 'train.jsonl'}: task 't' needs at least 2 labels, found ['pos']"
    ]


def test_labels_sorted_by_default_and_declared_order_kept(tmp_path):
    rows = (_row("a", "sport"), _row("b", "food"), _row("c", "tech"))
    default = load_task(_task(tmp_path, train=rows, dev=rows), tmp_path)
    assert default.labels == ["food", "sport", "tech"]
    assert default.splits["train"].labels.tolist() == [1, 0, 2]
    declared = load_task(
        _task(tmp_path, train=rows, dev=rows, labels=["tech", "sport", "food"]), tmp_path
    )
    assert declared.labels == ["tech", "sport", "food"]
    assert declared.splits["train"].labels.tolist() == [1, 2, 0]


def test_integer_labels_become_strings(tmp_path):
    rows = (_row("a", 1), _row("b", 0), _row("c", 1))
    data = load_task(_task(tmp_path, train=rows, dev=rows), tmp_path)
    assert data.labels == ["0", "1"]
    assert data.splits["train"].labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(("fmt", "sep"), [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_with_header(tmp_path, fmt, sep):
    lines = [f"id{sep}sentence{sep}y", f"1{sep}good one{sep}pos", f'2{sep}"bad, {sep}one"{sep}neg']
    _lines(tmp_path / "t" / f"train.{fmt}", *lines)
    _lines(tmp_path / "t" / f"dev.{fmt}", *lines)
    task = TaskConfig(name="t", format=fmt, text_field="sentence", label_field="y")
    data = load_task(task, tmp_path)
    assert data.labels == ["neg", "pos"]
    assert data.splits["dev"].texts == ["good one", f"bad, {sep}one"]
    assert data.splits["dev"].labels.tolist() == [1, 0]


def test_csv_missing_column(tmp_path):
    path = _lines(tmp_path / "train.csv", "sentence,label", "hi,pos")
    rows, errors = read_rows(path, "csv", "text", "label")
    assert rows == []
    assert errors == [f"{path}:1: header has no column 'text' (columns: ['sentence', 'label'])"]


def test_csv_row_errors_name_their_line(tmp_path):
    path = _lines(
        tmp_path / "train.csv", "text,label", "hello,pos", ",neg", "x,y,z", "only", "fine,neg"
    )
    rows, errors = read_rows(path, "csv", "text", "label")
    assert rows == [(2, "hello", "pos"), (6, "fine", "neg")]
    assert errors == [
        f"{path}:3: field 'text' is empty",
        f"{path}:4: more values than the 2 header columns",
        f"{path}:5: fewer values than the 2 header columns",
    ]


def test_jsonl_missing_field_and_csv_missing_field_read_rows(tmp_path):
    path = _lines(tmp_path / "a.jsonl", _row("ok", "pos"), json.dumps({"label": "pos"}))
    rows, errors = read_rows(path, "jsonl", "text", "label")
    assert rows == [(1, "ok", "pos")]
    assert errors == [f"{path}:2: missing field 'text' (fields present: ['label'])"]


@pytest.mark.parametrize(
    ("fmt", "lines"),
    [
        ("jsonl", [b'{"text": "ok", "label": "x"}', b'{"text": "caf\xe9", "label": "x"}']),
        ("csv", [b"text,label", b"caf\xe9,x"]),
    ],
)
def test_not_utf8_names_the_line(tmp_path, fmt, lines):
    path = tmp_path / f"a.{fmt}"
    path.write_bytes(b"\n".join([*lines, *lines[-1:]]) + b"\n")
    rows, errors = read_rows(path, fmt, "text", "label")
    at = lines[1].index(b"\xe9")
    assert errors == [
        f"{path}:2: not UTF-8 text (invalid continuation byte at byte {at} of the line); "
        "the rest of the file was not read"
    ]
    assert rows == ([(1, "ok", "x")] if fmt == "jsonl" else [])


def test_load_tasks_collects_errors_of_every_task(tmp_path):
    _task(tmp_path, "first", train=(*GOOD_TRAIN, "{oops"), dev=GOOD_TRAIN)
    _task(tmp_path, "second", train=GOOD_TRAIN, dev=(*GOOD_TRAIN, _row("x", "other")))
    config = parse_config(
        {"data_root": str(tmp_path), "tasks": [{"name": "first"}, {"name": "second"}]}
    )
    with pytest.raises(DataError) as info:
        load_tasks(config)
    errors = info.value.errors
    assert len(errors) == 2
    assert errors[0].startswith(f"{tmp_path / 'first' / 'train.jsonl'}:3: invalid JSON")
    assert errors[1].startswith(f"{tmp_path / 'second' / 'dev.jsonl'}:3: label 'other'")


def test_load_tasks_fixed_labels_override_the_config(tiny_data_dir):
    config = parse_config(
        {"data_root": str(tiny_data_dir), "tasks": [{"name": "sentiment"}, {"name": "topic"}]}
    )
    tasks = load_tasks(config, labels={"topic": ["tech", "sport", "food"]})
    assert [t.name for t in tasks] == ["sentiment", "topic"]
    assert tasks[0].labels == ["negative", "positive"]
    assert tasks[1].labels == ["tech", "sport", "food"]


def test_format_stats_lists_every_task_and_split(tiny_data_dir):
    config = parse_config(
        {"data_root": str(tiny_data_dir), "tasks": [{"name": "sentiment"}, {"name": "topic"}]}
    )
    lines = format_stats(load_tasks(config)).splitlines()
    assert lines[0].split()[:3] == ["task", "split", "n"]
    rows = {tuple(line.split()[:3]) for line in lines[1:]}
    assert rows == {
        ("sentiment", "train", "48"),
        ("sentiment", "dev", "24"),
        ("topic", "train", "48"),
        ("topic", "dev", "24"),
    }
    topic_train = next(line for line in lines if line.startswith("topic") and "train" in line)
    assert "food 33%" in topic_train and "sport 33%" in topic_train and "tech 33%" in topic_train


def test_fingerprint_changes_with_content_and_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_task_rows("sentiment", 4, 0))
    b = write_jsonl(tmp_path / "b.jsonl", make_task_rows("topic", 4, 0))
    base = fingerprint_files([a, b])
    assert base == fingerprint_files([a, b])
    assert len(base) == 64
    assert base != fingerprint_files([b, a])
    assert base != fingerprint_files([a, b], extra="v2")
    with b.open("a") as f:
        f.write(_row("one more", "tech") + "\n")
    assert base != fingerprint_files([a, b])


def test_cross_task_overlap_is_measured_and_removed(tmp_path):
    from pipeline.config import TaskConfig
    from pipeline.data import cross_task_overlap, decontaminate, load_task

    shared = [{"text": f"shared sentence {i} !", "label": "a"} for i in range(3)]
    write_jsonl(
        tmp_path / "one" / "train.jsonl",
        [{"text": "x y", "label": "a"}, {"text": "z", "label": "b"}],
    )
    write_jsonl(
        tmp_path / "one" / "dev.jsonl",
        [{"text": "Shared  sentence 0!", "label": "a"}, {"text": "q", "label": "b"}],
    )
    write_jsonl(
        tmp_path / "two" / "train.jsonl",
        [*shared, {"text": "own", "label": "b"}],
    )
    write_jsonl(
        tmp_path / "two" / "dev.jsonl", [{"text": "w", "label": "a"}, {"text": "v", "label": "b"}]
    )
    tasks = [load_task(TaskConfig(name=n), tmp_path) for n in ("one", "two")]
    overlap = cross_task_overlap(tasks)
    assert overlap == [{"dev_task": "one", "train_task": "two", "n": 1, "n_dev": 2, "share": 0.5}]
    removed = decontaminate(tasks)
    assert removed == {"one": 0, "two": 1}
    assert "shared sentence 0 !" not in tasks[1].splits["train"].texts
    assert len(tasks[1].splits["train"].labels) == 3
    # The kept rows are named, so cached features of the whole file can serve the subset.
    assert tasks[1].splits["train"].rows.tolist() == [1, 2, 3]
    assert tasks[0].splits["train"].rows is None
    assert cross_task_overlap(tasks) == []
