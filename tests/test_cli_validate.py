"""`polytask validate`: exit 0 and a stats table for a good run config; exit 2 with every problem,
its field path or file:line, on stderr for a bad one."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import DATA_DIR_ENV


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def test_valid_config_prints_stats_and_ok(tiny_config_file, capsys):
    assert main(["validate", str(tiny_config_file)]) == 0
    out, err = capsys.readouterr()
    assert f"{tiny_config_file}: OK (2 tasks)" in out
    for task, split in [("sentiment", "train"), ("sentiment", "dev"), ("topic", "dev")]:
        assert any(line.split()[:2] == [task, split] for line in out.splitlines())
    assert "error" not in err


def test_broken_config_prints_field_paths(tiny_config_file, capsys):
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["train"]["epochs"] = 0
    raw["shared"]["capcity"] = 8
    tiny_config_file.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tiny_config_file)]) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out
    assert "2 error(s)" in err
    assert f"{tiny_config_file}: shared.capcity: unknown key" in err
    assert f"{tiny_config_file}: train.epochs: Input should be greater than or equal to 1" in err


def test_set_override_is_validated(tiny_config_file, capsys):
    assert main(["validate", str(tiny_config_file), "--set", "train.epochs=-1"]) == 2
    assert "train.epochs:" in capsys.readouterr().err


def test_malformed_data_line_prints_file_and_line(
    tiny_config_file, tiny_data_dir, tmp_path, capsys
):
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    dev = data / "topic" / "dev.jsonl"
    n_lines = len(dev.read_text().splitlines())
    with dev.open("a") as f:
        f.write('{"text": "a broken line", "label": \n')
    assert main(["validate", str(tiny_config_file), "--data-dir", str(data)]) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out
    assert "1 data problem(s)" in err
    assert f"{dev}:{n_lines + 1}: invalid JSON" in err
    # The session fixture's data was not touched.
    assert len((tiny_data_dir / "topic" / "dev.jsonl").read_text().splitlines()) == n_lines


def test_data_dir_env_is_used(tiny_config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    assert main(["validate", str(tiny_config_file)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty' / 'sentiment' / 'train.jsonl'}: file not found" in err
    assert f"{tmp_path / 'empty' / 'topic' / 'dev.jsonl'}: file not found" in err


def test_missing_encoder_is_reported(tiny_config_file, tmp_path, capsys):
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["encoder"]["path"] = str(tmp_path / "no-encoder")
    tiny_config_file.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tiny_config_file)]) == 2
    assert (
        f"encoder.path: directory not found: {tmp_path / 'no-encoder'}" in capsys.readouterr().err
    )


def test_missing_config_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert main(["validate", str(path)]) == 2
    assert f"{path}: file not found" in capsys.readouterr().err
