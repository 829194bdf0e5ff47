"""CLI argument and output hardening (review s24 items 4-7, 10-12, 14-18): bad arguments are
refused with `error: ...` or argparse's usage message and exit 2, before any work (no model
loaded, no BentoML started, no training), and a closed stdout pipe ends the command quietly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_tiny_run

from pipeline.cli import main
from serving import cli as serving_cli
from serving import commands
from serving.schemas import RequestError, parse_predict_request

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], entry=main) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a CLI; argparse's SystemExit becomes its status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or starting BentoML fails the test: the checks must come first."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("reached the model store / BentoML before the argument checks")

    monkeypatch.setattr(commands, "resolve_model", refuse)
    monkeypatch.setattr(commands, "_load_servable", refuse)
    import bentoml

    monkeypatch.setattr(bentoml, "serve", refuse)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- predict (4, 5)
@pytest.mark.parametrize("entry", [main, serving_cli.main], ids=["polytask", "polytask-serving"])
def test_predict_refuses_invalid_utf8_naming_the_index(no_model, entry):
    # Python decodes invalid UTF-8 in argv to lone surrogates (surrogateescape): b"\xff".
    code, out, err = _run(["predict", "fine", "good \udcff\udcfe film"], entry)
    assert code == 2 and out == ""
    assert "error: text 1: not valid Unicode" in err and "Traceback" not in err


def test_predict_refuses_invalid_utf8_from_a_real_command_line(tmp_path):
    """The bytes as a shell passes them: no TypeError traceback, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "predict", b"good \xff\xfe film"],
        cwd=REPO,
        env={**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")},  # never the user's store
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: text 0: not valid Unicode" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("entry", [main, serving_cli.main], ids=["polytask", "polytask-serving"])
@pytest.mark.parametrize("blank", ["", "   ", "\x01", "\t\u200b\n"])
def test_predict_refuses_empty_texts_like_the_service(no_model, entry, blank):
    code, out, err = _run(["predict", "a good film", blank], entry)
    assert code == 2 and out == ""
    assert "error: text 1: empty" in err


def test_predict_applies_the_services_rule():
    """The CLI refuses exactly the texts /predict refuses as empty_text or invalid_text."""
    candidates = ["ok", "", " ", "\x00", "\u200b", "\ufeff", "a\x01", "\udcff", "é", "\u3000x"]
    for text in candidates:
        try:
            parse_predict_request(json.dumps({"texts": [text]}).encode())
            service_refuses = False
        except RequestError as err:
            service_refuses = err.reason in ("empty_text", "invalid_text")
        try:
            commands.check_texts([text])
            cli_refuses = False
        except commands.InputError:
            cli_refuses = True
        assert cli_refuses == service_refuses, repr(text)


def test_predict_lists_several_indices(no_model):
    code, _, err = _run(["predict", "", "fine", " "])
    assert code == 2 and "error: texts 0, 2: empty" in err


# ------------------------------------------------------------------------------ serve (6, 7, 18)
@pytest.mark.parametrize("entry", [main, serving_cli.main], ids=["polytask", "polytask-serving"])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers: expected an integer >= 1, got 0"),
        (["--api-workers", "0"], "--api-workers: expected an integer >= 1, got 0"),
        (["--port", "70000"], "--port: expected a port number 1-65535, got 70000"),
        (["--port", "0"], "--port: expected a port number 1-65535, got 0"),
        (["--port", "-1"], "--port: expected a port number 1-65535, got -1"),
        (["--port", "http"], "--port: expected a port number"),
    ],
)
def test_serve_refuses_bad_numbers_in_argparse(no_model, entry, args, message):
    code, _, err = _run(["serve", *args], entry)
    assert code == 2 and message in err


def test_serve_refuses_far_more_workers_than_cpus(no_model, monkeypatch):
    monkeypatch.setattr(commands, "usable_cpus", lambda: 2)
    code, _, err = _run(["serve", "--port", str(_free_port()), "--workers", "24"])
    assert code == 2 and "--workers 24: at most 8 (4 per CPU, 2 CPU(s) here)" in err


def test_serve_warns_above_the_cpu_count(monkeypatch, caplog):
    monkeypatch.setattr(commands, "usable_cpus", lambda: 2)
    started = []
    monkeypatch.setattr(commands, "resolve_model", lambda *a, **k: None)
    import bentoml

    monkeypatch.setattr(bentoml, "serve", lambda *a, **k: started.append(k))
    monkeypatch.setenv("POLYTASK_WORKERS", "1")  # restored after the test (serve() sets it)
    commands.serve(port=_free_port(), workers=3)
    assert started, "3 workers on 2 CPUs is allowed, with a warning"
    assert "--workers 3 is more than the 2 CPU(s)" in caplog.text


@pytest.mark.parametrize("entry", [main, serving_cli.main], ids=["polytask", "polytask-serving"])
def test_serve_refuses_a_port_in_use(no_model, entry):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = _run(["serve", "--port", str(port)], entry)
    assert code == 2
    assert f"error: cannot listen on 127.0.0.1:{port}: the port is already in use" in err


@pytest.mark.parametrize("host", ["999.1.1.1", "bad host", "localhost"])
def test_serve_refuses_a_host_that_is_not_an_ip_address(no_model, host):
    code, _, err = _run(["serve", "--host", host, "--port", str(_free_port())])
    assert code == 2 and f"error: --host {host!r}: not an IP address" in err


def test_serve_refuses_an_address_not_of_this_machine(no_model):
    code, _, err = _run(["serve", "--host", "192.0.2.1", "--port", str(_free_port())])
    assert code == 2 and "cannot listen on 192.0.2.1" in err


def test_serve_function_checks_the_port_range_too(no_model):
    with pytest.raises(commands.ServeError, match="a port is 1-65535"):
        commands.serve(port=70000)


# ------------------------------------------------------------------------ broken pipe (16)
@pytest.mark.parametrize("module", ["pipeline.cli", "serving.cli"])
def test_predict_into_a_closed_pipe_exits_quietly(module):
    script = (
        "import sys\n"
        "import serving.commands as c\n"
        "c.predict_local = lambda texts, model=None: None\n"
        "c.format_prediction = lambda texts, p: 'line\\n' * 200000\n"
        f"from {module} import main\n"
        "sys.exit(main(['predict', 'a good film']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_a_broken_pipe_that_is_not_stdouts_is_not_hidden(capfd):
    with pytest.raises(BrokenPipeError):
        serving_cli.quiet_broken_pipe(BrokenPipeError(32, "a subprocess's pipe"))


# ---------------------------------------------------------------------- evaluate --output (17)
@pytest.fixture
def no_evaluation(monkeypatch):
    import pipeline.evaluate

    def refuse(*_args, **_kwargs):
        raise AssertionError("evaluated before checking --output")

    monkeypatch.setattr(pipeline.evaluate, "evaluate_run", refuse)


@pytest.mark.parametrize(
    "output, message",
    [
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: Path("/proc/nope/x.json"), "cannot create directory /proc/nope"),
        (lambda tmp: tmp / "a-file" / "x.json", "is not a directory"),
    ],
    ids=["directory", "uncreatable", "under-a-file"],
)
def test_evaluate_checks_output_before_evaluating(no_evaluation, tmp_path, output, message):
    (tmp_path / "a-file").write_text("x")
    code, out, err = _run(["evaluate", str(tmp_path), "--output", str(output(tmp_path))])
    assert code == 2 and out == ""
    assert "error: --output" in err and message in err and "Traceback" not in err


def test_evaluate_writes_a_new_output(monkeypatch, tmp_path):
    import pipeline.evaluate

    monkeypatch.setattr(pipeline.evaluate, "evaluate_run", lambda *a, **k: {"t": {"acc": 1}})
    monkeypatch.setattr(pipeline.evaluate, "format_results", lambda r: "table")
    target = tmp_path / "new" / "eval.json"
    code, out, _ = _run(["evaluate", str(tmp_path), "--output", str(target)])
    assert code == 0 and target.exists() and f"wrote {target}" in out


# -------------------------------------------------------------- add-task, remove-task (10-15)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        (["--epochs", "-1"], "--epochs: expected an integer >= 1, got -1"),
        (["--align-epochs", "-3"], "--align-epochs: expected an integer >= 0, got -3"),
        (["--align-lr", "nan"], "--align-lr: expected a finite number > 0, got nan"),
        (["--align-lr", "inf"], "--align-lr: expected a finite number > 0, got inf"),
        (["--align-lr", "-1"], "--align-lr: expected a finite number > 0, got -1"),
        (["--align-lr", "0"], "--align-lr: expected a finite number > 0, got 0"),
    ],
)
def test_add_task_refuses_bad_numbers_before_any_work(tmp_path, args, message):
    code, _, err = _run(["add-task", str(tmp_path / "nope"), "--task", "t2", *args])
    assert code == 2 and message in err


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "one of the arguments --task --config is required"),
        (["--task", "t2", "--config", "x.yaml"], "argument --config: not allowed with"),
    ],
    ids=["neither", "both"],
)
def test_add_task_needs_exactly_one_of_task_and_config(tmp_path, args, message):
    code, _, err = _run(["add-task", str(tmp_path), *args])
    assert code == 2 and message in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("hardening"), tiny_data_dir, tiny_encoder_dir)


def test_add_task_refuses_an_existing_run_name_before_training(tiny_run, monkeypatch):
    import pipeline.data

    def refuse(*_args, **_kwargs):
        raise AssertionError("loaded the new task's data before checking --run-name")

    monkeypatch.setattr(pipeline.data, "load_tasks", refuse)
    taken = tiny_run.parent / "taken"
    taken.mkdir()
    code, _, err = _run(["add-task", str(tiny_run), "--task", "topic2", "--run-name", "taken"])
    assert code == 2 and f"--run-name 'taken': {taken} already exists" in err


def test_add_tasks_refuses_bad_numbers_as_a_library_call(tiny_run):
    from pipeline.incremental import IncrementalError, add_tasks, new_task_config

    task = new_task_config("topic2")
    for kwargs in ({"epochs": 0}, {"align_epochs": -1}, {"align_lr": float("inf")}):
        with pytest.raises(IncrementalError, match="add-task: "):
            add_tasks(tiny_run, [task], **kwargs)


def test_remove_task_refuses_a_task_given_twice(tiny_run):
    before = sorted(p.name for p in tiny_run.parent.iterdir())
    code, _, err = _run(["remove-task", str(tiny_run), "topic", "topic"])
    assert code == 2 and "error: remove-task: task(s) ['topic'] given twice" in err
    assert sorted(p.name for p in tiny_run.parent.iterdir()) == before


def test_a_child_run_appears_only_once_it_passed_its_check(tiny_run, monkeypatch):
    # Review s24 #13: a child killed during its check left run.json and weights in place: a
    # complete-looking run that `evaluate` accepted, though it never passed.
    import pipeline.incremental as incremental

    seen = {}
    real = incremental.check_child

    def check(parent, run_dir):
        seen["checked"] = run_dir
        seen["visible"] = (tiny_run.parent / "checked-child").exists()
        real(parent, run_dir)

    monkeypatch.setattr(incremental, "check_child", check)
    result = incremental.remove_tasks(tiny_run, ["topic"], run_name="checked-child")
    assert seen["visible"] is False and seen["checked"].name.startswith(".checked-child.partial-")
    assert result.run_dir == tiny_run.parent / "checked-child"
    assert (result.run_dir / "run.json").is_file() and not seen["checked"].exists()

    def killed(parent, run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(incremental, "check_child", killed)
    with pytest.raises(KeyboardInterrupt):
        incremental.remove_tasks(tiny_run, ["topic"], run_name="killed-child")
    assert not [p for p in tiny_run.parent.iterdir() if "killed-child" in p.name]


@pytest.mark.parametrize("name", ["POLYTASK_WORKERS", "POLYTASK_API_WORKERS"])
def test_a_worker_count_of_zero_from_the_environment_is_refused(monkeypatch, name):
    # It silently meant 1 (review s24 #6, left after the flag was checked).
    import os
    import subprocess
    import sys

    from serving import commands

    monkeypatch.setenv(name, "0")
    with pytest.raises(commands.ServeError, match=f"{name}='0': at least 1 worker"):
        commands.serve(port=3999)
    proc = subprocess.run(
        [sys.executable, "-c", "import serving.service"],
        env={**os.environ, name: "0"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and f"{name}=0: at least 1 worker" in proc.stderr
