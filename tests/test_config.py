"""The run config: unknown keys and bad values fail with their paths, all at once; paths resolve
against the config file; every shipped config validates and says how to run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import DATA_DIR_ENV, ConfigError, load_config, parse_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# An empty glob must not make the shipped-config tests pass vacuously: fall back to the one
# config that has to exist, so that the test fails with "file not found".
SHIPPED_CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml")) or [
    REPO_ROOT / "configs" / "senteval6.yaml"
]


def _minimal(**extra: object) -> dict:
    return {"tasks": [{"name": "sentiment"}, {"name": "topic"}], **extra}


def _errors(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "x.yaml")
    return info.value.errors


def _write(path: Path, raw: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    """Tests see no POLYTASK_DATA_DIR from the machine they run on."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def test_minimal_config_takes_documented_defaults():
    config = parse_config(_minimal())
    assert config.task_names == ["sentiment", "topic"]
    assert config.shared.capacity == 100
    assert config.sampler.kind == "proportional"
    assert config.train.precision == "auto"


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (_minimal(epochs=3), "epochs: unknown key"),
        (_minimal(shared={"capcity": 100}), "shared.capcity: unknown key"),
        (
            {"tasks": [{"name": "sentiment", "label_feild": "y"}]},
            "tasks[0].label_feild: unknown key",
        ),
    ],
    ids=["top-level", "nested", "in-list"],
)
def test_unknown_key_is_rejected_with_its_path(raw, line):
    assert line in _errors(raw)


def test_all_errors_are_reported_together():
    raw = {
        "tasks": [{"name": "sentiment"}, {"name": "topic", "label_field": ""}],
        "train": {"epochs": 0},
        "shared": {"capcity": 3},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "configs/x.yaml")
    err = info.value
    paths = [e.split(":")[0] for e in err.errors]
    assert paths == ["tasks[1].label_field", "shared.capcity", "train.epochs"]
    # The message names the source on every line and counts the problems.
    text = str(err)
    assert text.startswith("3 error(s) in configs/x.yaml:")
    assert "configs/x.yaml: train.epochs: Input should be greater than or equal to 1" in text
    assert "configs/x.yaml: tasks[1].label_field:" in text


def test_missing_tasks_is_a_required_field():
    assert _errors({}) == ["tasks: required field is missing"]


@pytest.mark.parametrize("name", ["Sentiment", "1task", "my-task", "", "a" * 33])
def test_task_name_must_match_pattern(name):
    errors = _errors({"tasks": [{"name": name}]})
    assert len(errors) == 1
    assert errors[0].startswith("tasks[0].name: String should match pattern")


def test_duplicate_task_names_are_rejected():
    errors = _errors({"tasks": [{"name": "a"}, {"name": "b"}, {"name": "a"}]})
    assert len(errors) == 1
    assert "duplicate task names: ['a']" in errors[0]


@pytest.mark.parametrize(("labels", "message"), [(["x"], "at least 2"), (["x", "x"], "duplicate")])
def test_declared_labels_are_checked(labels, message):
    errors = _errors({"tasks": [{"name": "a", "labels": labels}]})
    assert len(errors) == 1
    assert errors[0].startswith("tasks[0].labels:")
    assert message in errors[0]


@pytest.mark.parametrize("rank", [2, 3])
def test_svd_rank_must_be_below_number_of_tasks(rank):
    errors = _errors(_minimal(weighting={"method": "svd", "rank": rank}))
    assert len(errors) == 1
    assert f"weighting.rank: {rank} must be below the number of tasks (2)" in errors[0]


def test_svd_rank_below_number_of_tasks_is_accepted():
    config = parse_config(
        {"tasks": [{"name": n} for n in "abc"], "weighting": {"method": "svd", "rank": 2}}
    )
    assert config.weighting.rank == 2


def test_invalid_yaml_reports_its_line(tmp_path):
    path = _write(tmp_path / "bad.yaml", "tasks:\n  - name: a\n\tcapacity: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.startswith("line 3, column 1: invalid YAML:")
    assert info.value.source == str(path)


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["file not found"]
    assert f"{path}: file not found" in str(info.value)


def test_non_mapping_yaml_is_a_config_error(tmp_path):
    path = _write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["(top level): expected a mapping, got list"]


def test_relative_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    enc = tmp_path / "encoders" / "tiny"
    path = _write(
        tmp_path / "conf" / "run.yaml",
        _minimal(data_root="../data", encoder={"path": "../encoders/tiny"}),
    )
    monkeypatch.chdir(tmp_path)  # not the config directory
    config = load_config(path)
    assert config.data_root == (tmp_path / "data").resolve()
    assert config.encoder.path == str(enc.resolve())
    assert config.tasks[0].split_path("train", config.data_root) == (
        (tmp_path / "data").resolve() / "sentiment" / "train.jsonl"
    )


def test_without_data_root_the_config_directory_is_the_root(tmp_path, monkeypatch):
    path = _write(tmp_path / "conf" / "run.yaml", _minimal())
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data_root == (tmp_path / "conf").resolve()


def test_task_paths_resolve_against_data_root(tmp_path):
    raw = {
        "data_root": str(tmp_path / "data"),
        "tasks": [
            {"name": "a", "data_dir": "sets/a", "format": "csv"},
            {"name": "b", "train": "b_train.tsv", "dev": str(tmp_path / "abs.tsv")},
        ],
    }
    config = load_config(_write(tmp_path / "run.yaml", raw))
    root = (tmp_path / "data").resolve()
    a, b = config.tasks
    assert a.split_path("dev", config.data_root) == root / "sets" / "a" / "dev.csv"
    assert b.split_path("train", config.data_root) == root / "b_train.tsv"
    assert b.split_path("dev", config.data_root) == tmp_path / "abs.tsv"


def test_data_dir_env_overrides_data_root(tmp_path, monkeypatch):
    path = _write(tmp_path / "run.yaml", _minimal(data_root="data"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert load_config(path).data_root == (tmp_path / "elsewhere").resolve()


def test_data_dir_argument_beats_env_and_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "run.yaml", _minimal(data_root="data"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    config = load_config(path, data_dir=tmp_path / "from-flag")
    assert config.data_root == (tmp_path / "from-flag").resolve()


def test_overrides_are_validated_like_the_file(tmp_path):
    path = _write(tmp_path / "run.yaml", _minimal(train={"epochs": 5}))
    config = load_config(path, overrides={"train.epochs": 2, "shared.capacity": 8})
    assert (config.train.epochs, config.shared.capacity) == (2, 8)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"train.epoch": 2})
    # The error names the --set key, not only the field: the file itself is fine.
    assert info.value.errors == ["train.epoch: unknown key (set by --set train.epoch)"]


def test_shipped_config_list_is_not_empty():
    names = [p.name for p in (REPO_ROOT / "configs").glob("*.yaml")]
    assert "senteval6.yaml" in names, f"configs/ holds {names}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    config = load_config(path)
    assert config.tasks
    assert config.data_root is not None and config.data_root.is_absolute()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_has_a_header_with_its_command(path):
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name} must start with a comment header"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert re.search(r"\bpolytask\s+(validate|train|evaluate|affinity)\b", text), (
        f"{path.name}: the header must give the `polytask <command>` line that runs it"
    )


def test_reserved_task_names_cover_torch_container_attributes():
    import torch.nn as nn

    from pipeline.config import RESERVED_TASK_NAMES

    live = {
        n
        for cls in (nn.ModuleDict, nn.ParameterDict)
        for n in set(dir(cls)) | set(vars(cls()))
        if not n.startswith("_")
    }
    # Only names the task-name pattern admits can clash.
    import re

    from pipeline.config import TASK_NAME_PATTERN

    clashing = {n for n in live if re.match(TASK_NAME_PATTERN, n)}
    assert clashing <= RESERVED_TASK_NAMES, sorted(clashing - RESERVED_TASK_NAMES)
