"""Bad input at the training-side boundaries (config file, `--set`, data files, `--run-name`,
`--seeds`, `--split`, an experiment's saved plan and results, schedule files) gives a clear
error naming what and where, with exit status 2 and no traceback, before any work; nothing
already stored (a run, `latest`) is touched."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict, write_jsonl

from pipeline.cli import main
from pipeline.config import DATA_DIR_ENV, ConfigError, load_config, parse_config
from pipeline.data import DataError, load_tasks, read_rows
from pipeline.experiments.runner import ExperimentError, load_results
from pipeline.jobs.schedule import ScheduleError, StateStore, load_schedules
from pipeline.runs import RunNameError, RunNotFoundError, point_latest, read_record


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def tree(path: Path) -> dict[str, bytes | None]:
    """Every path under `path` with its bytes (None for directories and links)."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(path.rglob("*"))
    }


def _minimal(**extra: object) -> dict:
    return {"tasks": [{"name": "sentiment"}, {"name": "topic"}], **extra}


# ------------------------------------------------------------------------------ --run-name
@pytest.fixture
def storage(tiny_config_file) -> Path:
    """The config's storage_path, holding a run `tiny-old` (a marker file stands for its
    record) and `latest` -> it."""
    storage = Path(yaml.safe_load(tiny_config_file.read_text())["storage_path"])
    run = storage / "tiny-old"
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"marker": 1}')
    (storage / "latest").symlink_to("tiny-old")
    return storage


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("latest", "reserved for the link to the newest run"),
        ("tiny-old", "already exists"),
        ("../escaped", "one directory name"),
        ("a/b", "one directory name"),
        (".hidden", "one directory name"),
        ("x" * 201, "at most 200 characters"),
    ],
)
def test_train_refuses_a_run_name_that_is_not_a_new_plain_directory(
    tiny_config_file, storage, name, expected
):
    before = tree(storage.parent)
    rc, _, err = run_cli(["train", str(tiny_config_file), "--run-name", name])
    assert rc == 2
    assert "--run-name" in err and expected in err and "Traceback" not in err
    assert tree(storage.parent) == before  # nothing written, the stored run untouched
    assert (storage / "latest").readlink() == Path("tiny-old")


def test_train_checks_the_run_name_before_any_work(tiny_config_file, storage, monkeypatch):
    import pipeline.train.driver as driver
    from pipeline.train.driver import train

    def no_work(*a, **k):
        raise AssertionError("work started before the run name was checked")

    monkeypatch.setattr(driver, "check_writable_outputs", no_work)
    monkeypatch.setattr(driver, "load_tasks", no_work)
    config = load_config(tiny_config_file)
    for name in ("latest", "tiny-old", "../x"):
        with pytest.raises(RunNameError, match="--run-name"):
            train(config, run_name=name)


def test_retrain_refuses_an_existing_run_name_before_the_job_starts(
    tiny_config_file, storage, monkeypatch
):
    import pipeline.jobs.retrain as retrain_module

    def never(*a, **k):
        raise AssertionError("retrain started")

    monkeypatch.setattr(retrain_module, "retrain", never)
    for name in ("tiny-old", "latest", "../x"):
        rc, _, err = run_cli(["retrain", str(tiny_config_file), "--run-name", name])
        assert rc == 2 and "--run-name" in err, err


def test_add_and_remove_task_refuse_a_run_name_that_is_a_path(tmp_path):
    for argv in (
        ["add-task", str(tmp_path), "--task", "x", "--run-name", "../x"],
        ["remove-task", str(tmp_path), "x", "--run-name", "latest"],
    ):
        rc, _, err = run_cli(argv)
        assert rc == 2 and "--run-name" in err, err


def test_a_real_latest_directory_is_refused_before_training(tiny_config_file):
    storage = Path(yaml.safe_load(tiny_config_file.read_text())["storage_path"])
    (storage / "latest").mkdir(parents=True)
    (storage / "latest" / "keep.txt").write_text("mine")
    rc, _, err = run_cli(["train", str(tiny_config_file)])
    assert rc == 2 and "latest is not a link but a real directory" in err
    assert (storage / "latest" / "keep.txt").read_text() == "mine"
    assert [p.name for p in storage.iterdir()] == ["latest"]


def test_point_latest_leaves_no_stray_link_when_latest_is_a_directory(tmp_path):
    (tmp_path / "run-a").mkdir()
    (tmp_path / "latest").mkdir()
    with pytest.raises(RunNameError, match="the run is in"):
        point_latest(tmp_path, tmp_path / "run-a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-a"]


# ------------------------------------------------------------------------- non-finite floats
@pytest.mark.parametrize(
    "key",
    [
        "optim.lr",
        "optim.encoder_lr",
        "promotion.tolerance",
        "routing.margin_se",
        "aux.temperature",
        "aux.gamma",
        "sampler.temperature",
        "scaling.cpus_per_worker",
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused_naming_the_field(key, value):
    section, field = key.split(".")
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(**{section: {field: value}}), "x.yaml")
    assert any(e.startswith(f"{key}:") for e in info.value.errors), info.value.errors
    if value == float("inf") and key != "routing.margin_se":
        assert any("finite" in e for e in info.value.errors)


def test_infinite_own_path_margin_is_refused_too():
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(routing={"own": {"margin_se": float("inf")}}), "x.yaml")
    assert info.value.errors == ["routing.own.margin_se: Input should be a finite number"]


# ------------------------------------------------------------------------ the config file
def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_deeply_nested_yaml_config_is_a_config_error(tmp_path):
    path = _config_file(
        tmp_path, "tasks: [{name: a}, {name: b}]\nmonitoring: " + "[" * 500 + "]" * 500 + "\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path) and "nested too deeply" in info.value.errors[0]


def test_non_utf8_config_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"tasks: [{name: a}, {name: b}]\n# caf\xe9\n")
    rc, _, err = run_cli(["validate", str(path)])
    assert rc == 2 and f"{path}: line 2: not UTF-8 text" in err and "Traceback" not in err


def test_a_number_over_4300_digits_in_a_config_is_a_config_error(tmp_path):
    path = _config_file(
        tmp_path, "tasks: [{name: a}, {name: b}]\npromotion: {tolerance: " + "9" * 5000 + "}\n"
    )
    with pytest.raises(ConfigError, match="a number over 4,300 digits"):
        load_config(path)


def test_a_huge_file_given_as_config_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    with pytest.raises(ConfigError, match="larger than 1,048,576 bytes"):
        load_config(path)


def test_duplicate_keys_in_a_config_name_the_key_and_both_lines(tmp_path):
    text = "tasks: [{name: a}, {name: b}]\ntrain:\n  epochs: 1\n  batch_size: 4\ntrain:\n  epochs: 500\n"
    with pytest.raises(ConfigError) as info:
        load_config(_config_file(tmp_path, text))
    assert info.value.errors == [
        "line 5, column 1: invalid YAML: duplicate key 'train' (first given at line 2)"
    ]


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = "tasks: [{name: a}, {name: b}]\naux: &d {enabled: false, gamma: 0.5}\ntrain: {<<: {epochs: 3, batch_size: 4}, epochs: 7}\n"
    config = load_config(_config_file(tmp_path, text))
    assert (config.train.epochs, config.train.batch_size) == (7, 4)


def test_set_does_not_write_through_a_yaml_alias(tmp_path):
    text = "tasks: [{name: a}, {name: b}]\naux: &off {enabled: false}\nalignment: *off\n"
    config = load_config(_config_file(tmp_path, text), overrides={"aux.enabled": True})
    assert config.aux.enabled is True and config.alignment.enabled is False


def test_symlink_loop_as_storage_path_is_a_config_error(tmp_path):
    (tmp_path / "loopy").symlink_to("loopy")
    path = _config_file(
        tmp_path, f"tasks: [{{name: a}}, {{name: b}}]\nstorage_path: {tmp_path / 'loopy'}\n"
    )
    with pytest.raises(ConfigError, match="Symlink loop"):
        load_config(path)


def test_text_field_equal_to_label_field_is_refused():
    with pytest.raises(ConfigError) as info:
        parse_config({"tasks": [{"name": "a", "text_field": "label"}, {"name": "b"}]}, "x.yaml")
    assert info.value.errors[0].startswith("tasks[0]: text_field and label_field are both")


def test_negative_seed_and_overlong_name_are_refused_naming_the_field():
    for raw, expected in (
        (_minimal(train={"seed": -1}), "train.seed: Input should be greater than or equal to 0"),
        (_minimal(name="n" * 300), "name: String should have at most 177 characters"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(raw, "x.yaml")
        assert info.value.errors == [expected]


# ------------------------------------------------------------------------------------ --set
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("name.x=1", "name.x: name is a str, not a section"),
        ("tasks.0.name=zz", "tasks.0.name: tasks is a list, not a section"),
        ("train.epochs=[1", "'train.epochs=[1': the value is not valid YAML"),
        (
            "train.epochs=!!python/object:os.system x",
            "'train.epochs=!!python/object:os.system x': the value is not valid YAML",
        ),
        ("train..epochs=3", "train..epochs: empty key part"),
        ("noequals", "'noequals': expected KEY=VALUE"),
    ],
)
def test_malformed_set_names_the_set_item(tiny_config_file, item, expected):
    rc, _, err = run_cli(["validate", str(tiny_config_file), "--set", item])
    assert rc == 2 and "Traceback" not in err
    assert f"--set: {expected}" in err, err


def test_a_bad_value_from_set_is_blamed_on_the_set_not_the_file(tiny_config_file):
    rc, _, err = run_cli(["validate", str(tiny_config_file), "--set", "optim.lr=.inf"])
    assert rc == 2
    assert "optim.lr: Input should be a finite number (set by --set optim.lr)" in err


# ------------------------------------------------------------------------------ data files
def _read(path: Path, fmt: str = "jsonl") -> tuple[list, list[str]]:
    return read_rows(path, fmt, "text", "label")


GOOD = b'{"text": "nice one", "label": "pos"}\n{"text": "bad one", "label": "neg"}\n'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b'{"text": "x", "label": "pos", "extra": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "invalid JSON: nested too deeply",
        ),
        (
            b'{"text": "x", "label": 1' + b"0" * 5000 + b"}",
            "invalid JSON: a number over 4,300 digits",
        ),
        (
            b'{"text": "caf\\ud800 x", "label": "pos"}',
            "field 'text' has a lone surrogate escape ('\\ud800') at character 3",
        ),
        (b'{"text": "x", "label": "\\udfff"}', "field 'label' has a lone surrogate escape"),
        (b'{"text": "x", "label": "pos", "label": "neg"}', "field 'label' is given twice"),
    ],
)
def test_a_bad_jsonl_line_is_an_error_at_its_file_and_line(tmp_path, line, expected):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + line + b"\n" + GOOD)
    rows, errors = _read(path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:3: {expected}"), errors
    assert len(rows) == 4  # the other lines are read


def test_a_paired_surrogate_escape_is_ordinary_text(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + b'{"text": "smile \\ud83d\\ude00", "label": "pos"}\n')
    rows, errors = _read(path)
    assert errors == [] and rows[-1][1] == "smile \U0001f600"


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label,label\nhello,pos,neg\nbye,neg,pos\n")
    assert _read(path, "csv") == (
        [],
        [f"{path}:1: header names column(s) ['label'] more than once"],
    )


def test_a_directory_or_a_symlink_loop_given_as_data_file_says_so(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    assert _read(tmp_path / "dir.jsonl")[1] == [
        f"{tmp_path / 'dir.jsonl'}: is a directory, not a data file"
    ]
    assert "symlink loop" in _read(tmp_path / "loop.jsonl")[1][0]


def test_validate_reports_a_surrogate_in_the_data_with_file_and_line(
    tiny_config_file, tiny_data_dir, tmp_path
):
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    train = data / "topic" / "train.jsonl"
    n = len(train.read_text().splitlines())
    with train.open("a") as f:
        f.write('{"text": "caf\\ud800 ball", "label": "sport"}\n')
    rc, _, err = run_cli(["validate", str(tiny_config_file), "--data-dir", str(data)])
    assert rc == 2 and f"{train}:{n + 1}: field 'text' has a lone surrogate escape" in err


# --------------------------------------------------------------------- encoder.max_length
def test_max_length_above_the_encoders_positions_is_refused(tiny_config_file, tiny_encoder_dir):
    # The tiny encoder has 64 positions (max_position_embeddings).
    assert run_cli(["validate", str(tiny_config_file), "--set", "encoder.max_length=64"])[0] == 0
    rc, _, err = run_cli(["validate", str(tiny_config_file), "--set", "encoder.max_length=65"])
    assert rc == 2
    assert "encoder.max_length: 65 is more than the 64 token positions of the encoder" in err
    assert str(tiny_encoder_dir / "config.json") in err


def test_training_refuses_max_length_above_the_encoders_positions(tiny_config_file, monkeypatch):
    import pipeline.train.driver as driver

    def no_work(*a, **k):
        raise AssertionError("data loaded before the encoder limit was checked")

    monkeypatch.setattr(driver, "load_tasks", no_work)
    config = load_config(tiny_config_file, overrides={"encoder.max_length": 1024})
    with pytest.raises(ConfigError, match="encoder.max_length: 1024"):
        driver.train(config)


# ---------------------------------------------------------------------------- experiments
def test_too_many_seeds_are_refused_before_anything_is_planned(tiny_config_file, monkeypatch):
    import pipeline.experiments.suite as suite

    def no_work(*a, **k):
        raise AssertionError("work started before --seeds was checked")

    monkeypatch.setattr("pipeline.features.resolve_encoder_path", no_work)
    monkeypatch.setattr("pipeline.data.load_tasks", no_work)
    monkeypatch.setattr(suite, "code_version", no_work)
    argv = ["experiment", str(tiny_config_file), "--suite", "transfer", "--in-process"]
    rc, _, err = run_cli([*argv, "--seeds", "1000000"])
    assert rc == 2 and "--seeds must be at most 100, got 1000000" in err


def test_output_that_is_a_file_is_an_error(tiny_config_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = ["experiment", str(tiny_config_file), "--suite", "transfer", "--seeds", "1"]
    rc, _, err = run_cli([*argv, "--in-process", "--output", str(afile)])
    assert rc == 2 and f"--output {afile} exists and is not a directory" in err


def _ok_result(tasks: tuple[str, ...] = ("sentiment", "topic")) -> dict:
    stage = {
        "joint": 50.0,
        "joint_best_epoch": 1,
        "align_best": None,
        "final": 50.0,
        "alignment_kept": False,
    }
    return {
        "status": "ok",
        "dev": dict.fromkeys(tasks, 50.0),
        "dev_macro": 50.0,
        "stages": dict.fromkeys(tasks, stage),
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"status": "ok", "dev": {"a": 50.0', "not valid JSON"),
        (b'{"status": "ok", "x": "\xff"}', "not UTF-8 text"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"status": "ok"}', "a finished run's result with a bad dev: Field required"),
        (
            b'{"status": "ok", "dev": {"sentiment": "high"}, "dev_macro": "x", "stages": {}}',
            "bad dev.sentiment",
        ),
        (
            json.dumps(_ok_result() | {"stages": {"topic": {"joint": "x"}}}).encode(),
            "bad stages.topic.",
        ),
        (
            json.dumps(_ok_result(("sentiment",))).encode(),
            "without the dev accuracy of ['topic']",
        ),
        (b'{"status": "ok", "dev": ' + b"[" * 5000 + b"]" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_a_tampered_result_file_is_an_error_naming_it(tmp_path, content, expected):
    from pipeline.experiments.common import RunSpec

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "good.json").write_text(json.dumps(_ok_result()))
    bad = tmp_path / "results" / "mtl-s0.json"
    bad.write_bytes(content)
    specs = [RunSpec("mtl-s0", "mtl", 0, ["sentiment", "topic"])]
    with pytest.raises(ExperimentError) as info:
        load_results(tmp_path, specs)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: ") and expected in msg, msg
    assert "delete this file" in msg


def test_good_and_failed_results_still_load(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text(json.dumps(_ok_result()))
    (tmp_path / "results" / "b.json").write_text('{"status": "failed", "error": "x"}')
    results = load_results(tmp_path)
    assert list(results) == ["a"] and results["a"]["dev"]["topic"] == 50.0


@pytest.fixture
def own_data_config(tmp_path, tiny_data_dir, tiny_encoder_dir) -> tuple[Path, Path]:
    """A tiny config on a copy of the tiny data (so that a test may change it)."""
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    cfg = tiny_config_dict(data, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, data


def _plan_only(config: Path, out: Path, monkeypatch) -> None:
    """Run an experiment up to its plan.json, training nothing."""
    import pipeline.experiments.suite as suite

    class Planned(Exception):
        pass

    def stop(*a, **k):
        raise Planned

    with monkeypatch.context() as m:
        m.setattr(suite, "run_specs", stop)
        m.setattr(suite, "warm_feature_cache", lambda *a, **k: None)
        with pytest.raises(Planned):
            suite.run_experiment(
                load_config(config), "transfer", 1, output=out, executor="local", write=print
            )


def test_resume_refuses_runs_trained_on_changed_data(own_data_config, tmp_path, monkeypatch):
    from pipeline.experiments.suite import run_experiment

    config, data = own_data_config
    out = tmp_path / "suite"
    _plan_only(config, out, monkeypatch)
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["data"]) == {"sentiment", "topic"}
    rows = (data / "topic" / "train.jsonl").read_text().splitlines()
    write_jsonl(data / "topic" / "train.jsonl", [json.loads(r) for r in reversed(rows)])
    with pytest.raises(ExperimentError) as info:
        run_experiment(load_config(config), "transfer", 1, resume=out, report_only=True)
    assert "the data of task(s) topic changed" in str(info.value)
    assert json.loads((out / "plan.json").read_text()) == plan  # the saved plan is kept


def test_resume_of_a_plan_without_fingerprints_says_it_cannot_check(
    own_data_config, tmp_path, monkeypatch
):
    from pipeline.experiments.suite import check_plan

    config, _ = own_data_config
    out = tmp_path / "suite"
    _plan_only(config, out, monkeypatch)
    plan = json.loads((out / "plan.json").read_text())
    old = {k: v for k, v in plan.items() if k != "data"}
    (out / "plan.json").write_text(json.dumps(old))
    lines: list[str] = []
    assert check_plan(out, plan, lines.append) is False
    assert "records no data fingerprints" in lines[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"suite": "transfer", "con', "not valid JSON"),
        (b"[]", "expected a JSON object, got list"),
        (b'{"suite": "transfer", "config": []}', "config: expected a JSON object"),
        (
            b'{"suite": "transfer", "config": {}, "options": {}}',
            "specs: expected a JSON array (missing)",
        ),
        (b'{"suite": "\xff"}', "not UTF-8 text"),
    ],
)
def test_a_tampered_plan_is_an_error_naming_it(tmp_path, content, expected):
    from pipeline.experiments.suite import check_plan

    (tmp_path / "plan.json").write_bytes(content)
    plan = {"suite": "transfer", "config": {}, "options": {}, "specs": [], "data": {}}
    with pytest.raises(ExperimentError) as info:
        check_plan(tmp_path, plan)
    assert str(info.value).startswith(f"{tmp_path / 'plan.json'}: ") and expected in str(info.value)


# ----------------------------------------------------------------------------- schedules
def _schedule_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'schedules:\n  - name: x\n    cron: "0 2 * * *"\n    entrypoint: [unclosed\n',
            "invalid YAML",
        ),
        (b"# caf\xe9\nschedules: []\n", "line 1: not UTF-8 text"),
        (b"schedules: " + b"[" * 500 + b"]" * 500 + b"\n", "nested too deeply"),
        (
            b'schedules:\n  - {name: x, cron: "0 2 * * *", entrypoint: "true"}\nschedules:\n  - {name: y, cron: "0 3 * * *", entrypoint: "true"}\n',
            "duplicate key 'schedules' (first given at line 1)",
        ),
        (
            b'schedules:\n  - name: feb\n    cron: "0 2 31 2 *"\n    entrypoint: "true"\n',
            "schedules.0.cron (schedule 'feb'): Value error, '0 2 31 2 *' matches no date",
        ),
    ],
)
def test_a_bad_schedule_file_is_an_error_naming_it(tmp_path, content, expected):
    path = _schedule_file(tmp_path, content)
    with pytest.raises(ScheduleError) as info:
        load_schedules(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value), info.value


def test_schedule_run_reports_a_bad_schedule_file_with_exit_2(tmp_path):
    path = _schedule_file(tmp_path, b"schedules:\n  - name: x\n    cron: [\n")
    rc, _, err = run_cli(["schedule", "run", str(path), "--state-dir", str(tmp_path / "st")])
    assert rc == 2 and str(path) in err and "Traceback" not in err


def test_a_feb_29_cron_still_loads(tmp_path):
    path = _schedule_file(
        tmp_path, b'schedules:\n  - {name: leap, cron: "0 0 29 2 *", entrypoint: "true"}\n'
    )
    assert [s.name for s in load_schedules(path)] == ["leap"]


def test_a_corrupt_schedule_history_is_an_error_naming_it(tmp_path):
    (tmp_path / "schedule.sqlite3").write_bytes(b"not a database at all, " * 20)
    with pytest.raises(ScheduleError, match="not a usable scheduler state"):
        StateStore(tmp_path)
    rc, _, err = run_cli(["schedule", "status", "--state-dir", str(tmp_path)])
    assert rc == 2 and str(tmp_path / "schedule.sqlite3") in err


# ------------------------------------------------------------------------------- the rest
def test_evaluate_and_affinity_refuse_a_split_that_is_a_path(tmp_path, tiny_config_file):
    rc, _, err = run_cli(["evaluate", str(tmp_path), "--split", "../b/dev"])
    assert rc == 2 and "--split '../b/dev': a split is a file name" in err
    rc, _, err = run_cli(["affinity", str(tiny_config_file), "--split", "../train"])
    assert rc == 2 and "--split '../train'" in err


def test_a_truncated_run_record_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "run.json").write_text('{\n "schema_version": 1,\n "run_na')
    with pytest.raises(RunNotFoundError) as info:
        read_record(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'run.json'}: not a readable run record")


def test_load_tasks_error_for_a_directory_names_it(tmp_path):
    (tmp_path / "a" / "train.jsonl").mkdir(parents=True)
    write_jsonl(tmp_path / "a" / "dev.jsonl", [{"text": "x", "label": "p"}])
    config = parse_config({"data_root": str(tmp_path), "tasks": [{"name": "a"}]})
    with pytest.raises(DataError) as info:
        load_tasks(config)
    assert f"{tmp_path / 'a' / 'train.jsonl'}: is a directory, not a data file" in info.value.errors


def test_a_suite_run_retried_after_a_failure_is_not_blocked_by_its_leftovers(tiny_config_file):
    """train() never overwrites a run directory; the suite runner owns its runs' directories
    and clears what a failed or interrupted attempt left (that run has no result) first."""
    from pipeline.config import config_to_dict
    from pipeline.experiments.runner import execute_run

    config = load_config(tiny_config_file, overrides={"train.epochs": 1})
    stale = config.storage_path / "mtl-s0"
    (stale / "checkpoint_000000").mkdir(parents=True)
    log = config.storage_path.parent / "logs" / "mtl-s0.log"
    result = execute_run(config_to_dict(config), "mtl-s0", str(log), False)
    assert result["status"] == "ok", result
    assert (stale / "run.json").is_file() and not (stale / "checkpoint_000000").exists()
    # A finished attempt whose result was never written (killed in between) is kept aside,
    # not deleted: it cost a training.
    first = (stale / "run.json").read_text()
    again = execute_run(config_to_dict(config), "mtl-s0", str(log), False)
    assert again["status"] == "ok", again
    kept = list(config.storage_path.glob("mtl-s0.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "run.json").read_text() == first


# --------------------------------------------------------------------------- csv/tsv records
def _text_file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_tsv_text_starting_with_a_quote_is_an_error_at_its_line_not_a_merged_row(tmp_path):
    # Review #16: csv's quoting read lines 2-3 as one example (a tab and a newline in its text,
    # line 2's label lost) and reported nothing.
    path = _text_file(
        tmp_path / "train.tsv",
        'text\tlabel\n"He left\tpos\nshe said" quietly\tneg\nthird row\tpos\nfourth row\tneg\n',
    )
    rows, errors = read_rows(path, "tsv", "text", "label")
    assert rows == [(4, "third row", "pos"), (5, "fourth row", "neg")]
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:2: a quoted field runs from line 2 to line 3: in tsv")


def test_an_unclosed_quote_is_reported_where_the_record_starts(tmp_path):
    # Before, the error named the end of the file (line 5), where the swallowing stopped.
    tsv = _text_file(tmp_path / "a.tsv", 'text\tlabel\n"He left\tpos\nb\tpos\nc\tneg\n')
    rows, errors = read_rows(tsv, "tsv", "text", "label")
    assert rows == []
    assert errors[0].startswith(f"{tsv}:2: a quoted field runs from line 2 to line 4")
    csv_path = _text_file(tmp_path / "a.csv", 'text,label\n"He left,pos\nb,pos\nc,neg\n')
    rows, errors = read_rows(csv_path, "csv", "text", "label")
    assert rows == []
    assert errors == [
        f"{csv_path}:2: fewer values than the 2 header columns (the record runs from line 2 "
        "to line 4): an unclosed quote?"
    ]


def test_quoted_tsv_fields_still_hold_tabs_and_doubled_quotes(tmp_path):
    path = _text_file(
        tmp_path / "train.tsv", 'text\tlabel\n"""a"" b"\tpos\n\n"tab\there"\tneg\nplain\tpos\n'
    )
    rows, errors = read_rows(path, "tsv", "text", "label")
    assert errors == []
    assert rows == [(2, '"a" b', "pos"), (4, "tab\there", "neg"), (5, "plain", "pos")]


def test_a_csv_record_spanning_lines_is_still_read_and_named_by_its_first_line(tmp_path):
    path = _text_file(tmp_path / "train.csv", 'text,label\n"two\nlines",pos\nnext,neg\n')
    rows, errors = read_rows(path, "csv", "text", "label")
    assert errors == []
    assert rows == [(2, "two\nlines", "pos"), (4, "next", "neg")]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_a_csv_file_without_a_header_row_is_an_error(tmp_path, content):
    path = _text_file(tmp_path / "train.tsv", content)
    assert read_rows(path, "tsv", "text", "label") == (
        [],
        [f"{path}:1: no header row (the file has no tsv records)"],
    )


def test_validate_refuses_a_promotion_minimum_for_an_unknown_task(tiny_config_file):
    # Review #22: a typo'd key passed `validate`; only `retrain` refused it, once a job ran.
    cfg = yaml.safe_load(tiny_config_file.read_text())
    cfg["promotion"] = {"minimums": {"sentimnet": 60}}
    tiny_config_file.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(["validate", str(tiny_config_file)])
    assert rc == 2 and "Traceback" not in err
    assert "promotion.minimums: unknown task(s) ['sentimnet']" in err, err
    cfg["promotion"] = {"minimums": {"sentiment": 60}}
    tiny_config_file.write_text(yaml.safe_dump(cfg))
    assert run_cli(["validate", str(tiny_config_file)])[0] == 0
