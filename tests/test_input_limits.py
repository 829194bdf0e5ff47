"""Training input limits (issue 9): a label column of mixed kinds, an over-long line or text, and
an unwritable `storage_path` or cache are errors with their file:line or field, found before any
work; a batch larger than a task's training set is a warning. Each of the issue's probes is a
test here: `0`/`1` mixed with `negative`/`positive`, a huge line (read without holding it), an
unwritable storage path under `validate` and `train`."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    ConfigError,
    DataLimitsConfig,
    TaskConfig,
    check_writable_outputs,
    parse_config,
)
from pipeline.data import DataError, load_task, read_rows


@pytest.fixture(autouse=True)
def _no_path_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)


def _write(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _row(text: object, label: object) -> str:
    return json.dumps({"text": text, "label": label})


def _errors(task: TaskConfig, root: Path, limits: DataLimitsConfig | None = None) -> list[str]:
    with pytest.raises(DataError) as info:
        load_task(task, root, limits=limits)
    return info.value.errors


# --- mixed label kinds ----------------------------------------------------------------------
def test_integer_and_named_labels_in_one_column_are_an_error_not_a_4_class_task(tmp_path):
    train = _write(
        tmp_path / "t" / "train.jsonl",
        _row("good", 1),
        _row("bad", 0),
        _row("great", "positive"),
        _row("awful", "negative"),
    )
    _write(tmp_path / "t" / "dev.jsonl", _row("fine", 1), _row("poor", 0))
    errors = _errors(TaskConfig(name="t"), tmp_path)
    assert errors == [
        f"{train}:3: label 'positive' is a string but the task's first label 1 (line 1) is an "
        "integer: one task's labels must be all integers or all strings",
        f"{train}:4: label 'negative' is a string but the task's first label 1 (line 1) is an "
        "integer: one task's labels must be all integers or all strings",
    ]


def test_integer_and_numeric_string_labels_are_mixed_types(tmp_path):
    train = _write(tmp_path / "t" / "train.jsonl", _row("a", 0), _row("b", "1"))
    _write(tmp_path / "t" / "dev.jsonl", _row("c", 0), _row("d", 1))
    [error] = _errors(TaskConfig(name="t"), tmp_path)
    assert error.startswith(f"{train}:2: label '1' is a string but the task's first label 0")


def test_dev_labels_of_another_type_than_train_name_both_files(tmp_path):
    train = _write(tmp_path / "t" / "train.jsonl", _row("a", 0), _row("b", 1))
    dev = _write(tmp_path / "t" / "dev.jsonl", _row("c", "0"), _row("d", "1"))
    errors = _errors(TaskConfig(name="t"), tmp_path)
    assert [e.split(": ")[0] for e in errors] == [f"{dev}:1", f"{dev}:2"]
    assert f"the task's first label 0 ({train}:1) is an integer" in errors[0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_numbers_and_names_in_string_labels_are_an_error_unless_declared(tmp_path, fmt):
    def line(text: str, label: str) -> str:
        return f"{text},{label}" if fmt == "csv" else _row(text, label)

    header = ("text,label",) if fmt == "csv" else ()
    lines = [line("good", "1"), line("bad", "0"), line("great", "positive")]
    train = _write(tmp_path / "t" / f"train.{fmt}", *header, *lines)
    _write(tmp_path / "t" / f"dev.{fmt}", *header, *lines)
    first = len(header) + 1
    errors = _errors(TaskConfig(name="t", format=fmt), tmp_path)
    [error] = [e for e in errors if e.startswith(f"{train}:")]
    assert error == (
        f"{train}:{first + 2}: label 'positive' is a name but the task's first label '1' "
        f"(line {first}) is a number: numbers and names in one column would train as separate "
        "classes; fix the data, or declare the task's `labels` if both are meant"
    )
    # Declared labels say the mix is meant: the task loads with exactly those classes.
    declared = TaskConfig(name="t", format=fmt, labels=["0", "1", "positive"])
    assert load_task(declared, tmp_path).splits["train"].labels.tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    ("label", "shown"),
    [(1.0, "1.0"), (False, "False"), (None, "None"), ({"a": 1}, "{'a': 1}"), ([1], "[1]")],
    ids=["float", "bool", "null", "object", "list"],
)
def test_labels_that_are_neither_integer_nor_string_name_their_line(tmp_path, label, shown):
    train = _write(tmp_path / "t" / "train.jsonl", _row("a", 1), _row("b", label), _row("c", 0))
    _write(tmp_path / "t" / "dev.jsonl", _row("d", 1), _row("e", 0))
    assert _errors(TaskConfig(name="t"), tmp_path) == [
        f"{train}:2: field 'label' must be a string or integer, got {shown}"
    ]


def test_one_kind_of_label_still_loads(tmp_path):
    _write(tmp_path / "t" / "train.jsonl", _row("a", "neg"), _row("b", "pos"))
    _write(tmp_path / "t" / "dev.jsonl", _row("c", "pos"))
    assert load_task(TaskConfig(name="t"), tmp_path).labels == ["neg", "pos"]


# --- line and text size -----------------------------------------------------------------------
def test_a_huge_line_is_refused_at_its_line_without_being_read_whole(tmp_path):
    limits = DataLimitsConfig(max_line_bytes=4096)
    huge = _row("x" * (20 << 20), "pos")  # a 20 MB line between two good ones
    path = _write(tmp_path / "train.jsonl", _row("good", "pos"), huge, _row("bad", "neg"))
    tracemalloc.start()
    try:
        rows, errors = read_rows(path, "jsonl", "text", "label", limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert errors == [f"{path}:2: line longer than data_limits.max_line_bytes (4,096 bytes)"]
    assert rows == [(1, "good", "pos"), (3, "bad", "neg")]  # the next line is read again
    assert peak < 1 << 20  # bounded reads: nowhere near the 20 MB of the line


def test_default_line_limit_refuses_a_line_over_one_mebibyte(tmp_path):
    path = _write(tmp_path / "train.jsonl", _row("x" * (2 << 20), "pos"), _row("ok", "neg"))
    rows, errors = read_rows(path, "jsonl", "text", "label")
    assert errors == [f"{path}:1: line longer than data_limits.max_line_bytes (1,048,576 bytes)"]
    assert rows == [(2, "ok", "neg")]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_line_of_exactly_the_limit_is_read(tmp_path, newline):
    limits = DataLimitsConfig(max_line_bytes=1024)
    line = _row("y" * (1024 - len(_row("", "pos"))), "pos")
    over = _row("y" * (1025 - len(_row("", "pos"))), "pos")
    assert (len(line.encode()), len(over.encode())) == (1024, 1025)
    path = tmp_path / "train.jsonl"
    path.write_bytes(f"{line}{newline}{over}{newline}".encode())
    rows, errors = read_rows(path, "jsonl", "text", "label", limits)
    assert [r[0] for r in rows] == [1]
    assert errors == [f"{path}:2: line longer than data_limits.max_line_bytes (1,024 bytes)"]


def test_a_text_over_max_text_chars_is_an_error(tmp_path):
    limits = DataLimitsConfig(max_text_chars=10)
    path = _write(tmp_path / "train.jsonl", _row("a" * 10, "pos"), _row("é" * 11, "neg"))
    rows, errors = read_rows(path, "jsonl", "text", "label", limits)
    assert [r[0] for r in rows] == [1]
    assert errors == [
        f"{path}:2: field 'text' has 11 characters, more than data_limits.max_text_chars (10)"
    ]


def test_csv_long_line_stops_the_file_at_its_line(tmp_path):
    limits = DataLimitsConfig(max_line_bytes=1024)
    path = _write(tmp_path / "train.csv", "text,label", "ok,pos", "z" * 5000 + ",neg", "b,neg")
    rows, errors = read_rows(path, "csv", "text", "label", limits)
    assert rows == [(2, "ok", "pos")]
    assert errors == [
        f"{path}:3: line longer than data_limits.max_line_bytes (1,024 bytes); the rest of the "
        "file was not read"
    ]


def test_csv_record_spanning_lines_is_bounded_too(tmp_path):
    limits = DataLimitsConfig(max_line_bytes=1024)
    quoted = '"' + "\n".join(["w" * 100] * 30) + '",pos'  # 30 short lines, one 3 KB record
    path = _write(tmp_path / "train.csv", "text,label", "ok,pos", quoted)
    rows, errors = read_rows(path, "csv", "text", "label", limits)
    assert rows == [(2, "ok", "pos")]
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:")
    assert "record longer than data_limits.max_line_bytes (1,024 bytes)" in errors[0]


def test_csv_field_over_the_csv_modules_limit_is_an_error_not_a_traceback(tmp_path):
    path = _write(tmp_path / "train.csv", "text,label", '"' + "q" * 200_000 + '",pos')
    rows, errors = read_rows(path, "csv", "text", "label")
    assert rows == []
    assert errors == [
        f"{path}:2: malformed csv: field larger than field limit (131072); the rest of the file "
        "was not read"
    ]


def test_data_limits_are_validated_config_fields():
    config = parse_config({"tasks": [{"name": "a"}]})
    assert config.data_limits == DataLimitsConfig(max_line_bytes=1 << 20, max_text_chars=100_000)
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"tasks": [{"name": "a"}], "data_limits": {"max_line_bytes": 10, "max_bytes": 1}}
        )
    assert sorted(info.value.errors) == [
        "data_limits.max_bytes: unknown key",
        "data_limits.max_line_bytes: Input should be greater than or equal to 1024",
    ]


# --- writable outputs -----------------------------------------------------------------------
def _config(tmp_path: Path, storage: Path, cache: Path):
    return parse_config(
        {"tasks": [{"name": "a"}], "storage_path": str(storage), "cache_dir": str(cache)}
    )


def test_writable_outputs_pass_and_leave_nothing_behind(tmp_path):
    (tmp_path / "runs").mkdir()
    check_writable_outputs(_config(tmp_path, tmp_path / "runs", tmp_path / "new" / "cache"))
    assert list((tmp_path / "runs").iterdir()) == []
    assert not (tmp_path / "new").exists()  # a directory to be created is not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_unwritable_storage_and_cache_are_named_with_their_paths(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = _config(tmp_path, blocker / "runs", blocker)
    with pytest.raises(ConfigError) as info:
        check_writable_outputs(config, source="c.yaml")
    assert info.value.errors == [
        f"storage_path: cannot create directory {blocker / 'runs'}: {blocker} is not a directory",
        f"cache_dir: {blocker} exists and is not a directory",
    ]
    assert blocker.read_text() == "not a directory"


def test_read_only_storage_path_is_refused(tmp_path):
    """A directory the process may not write into. Root writes anywhere (CAP_DAC_OVERRIDE), so
    as root (CI) the check runs in a child without capabilities (util-linux's setpriv)."""
    import shutil
    import subprocess
    import sys

    storage = tmp_path / "ro"
    storage.mkdir()
    storage.chmod(0o500)
    code = (
        "import sys\n"
        "from pipeline.config import ConfigError, check_writable_outputs, parse_config\n"
        "config = parse_config({'tasks': [{'name': 'a'}], 'storage_path': sys.argv[1],"
        " 'cache_dir': sys.argv[2]})\n"
        "try:\n"
        "    check_writable_outputs(config)\n"
        "except ConfigError as err:\n"
        "    print(err.errors[0]); sys.exit(3)\n"
    )
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run this check as root"
        prefix = [setpriv, "--bounding-set=-all", "--inh-caps=-all"]
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", code, str(storage), str(tmp_path / "cache")],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        storage.chmod(0o700)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"storage_path: directory {storage} is not writable (")


def test_cache_dir_from_the_environment_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("POLYTASK_CACHE_DIR", str(blocker / "cache"))
    config = parse_config({"tasks": [{"name": "a"}], "storage_path": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
        check_writable_outputs(config)
    assert info.value.errors == [
        f"cache_dir (POLYTASK_CACHE_DIR): cannot create directory {blocker / 'cache'}: "
        f"{blocker} is not a directory"
    ]


def _config_file(tiny_config_file: Path, **changes: object) -> Path:
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw.update(changes)
    tiny_config_file.write_text(yaml.safe_dump(raw))
    return tiny_config_file


@pytest.mark.parametrize("command", ["validate", "train"])
def test_validate_and_train_refuse_an_unwritable_storage_path_before_any_work(
    tmp_path, tiny_config_file, command, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = _config_file(tiny_config_file, storage_path=str(blocker / "runs"))
    cache = Path(yaml.safe_load(cfg.read_text())["cache_dir"])
    assert main([command, str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert f"storage_path: cannot create directory {blocker / 'runs'}" in err
    assert "Traceback" not in err and "OK" not in out
    assert not cache.exists()  # no features were computed: the check ran first


# --- CLI: data problems and the batch-size hint ------------------------------------------------
def test_validate_reports_mixed_labels_and_a_huge_line_with_file_and_line(
    tmp_path, tiny_config_file, tiny_data_dir, capsys
):
    data = tmp_path / "data"
    for task in ("sentiment", "topic"):
        for split in ("train", "dev"):
            src = (tiny_data_dir / task / f"{split}.jsonl").read_text()
            _write(data / task / f"{split}.jsonl", *src.splitlines())
    sentiment = data / "sentiment" / "train.jsonl"
    n = len(sentiment.read_text().splitlines())
    with sentiment.open("a") as f:
        f.write(_row("a number among names", 1) + "\n")
    topic = data / "topic" / "dev.jsonl"
    m = len(topic.read_text().splitlines())
    with topic.open("a") as f:
        f.write(_row("t" * 300_000, "tech") + "\n")
    args = ["validate", str(tiny_config_file), "--data-dir", str(data)]
    assert main([*args, "--set", "data_limits.max_line_bytes=65536"]) == 2
    err = capsys.readouterr().err
    assert "2 data problem(s)" in err
    assert f"{sentiment}:{n + 1}: label 1 is an integer but the task's first label" in err
    assert f"{topic}:{m + 1}: line longer than data_limits.max_line_bytes (65,536 bytes)" in err


def test_batch_larger_than_a_training_set_is_a_warning(tiny_config_file, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert main(["validate", str(tiny_config_file), "--set", "train.batch_size=64"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"task {t!r} has 48 training examples, fewer than train.batch_size 64: each of its "
        "batches is its whole training set"
        for t in ("sentiment", "topic")
    ]
    assert "OK (2 tasks)" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert main(["validate", str(tiny_config_file), "--set", "train.batch_size=48"]) == 0
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
