"""The image smoke tests' own logic (fast), and the train image end to end (`slow` tier).

CI builds and smoke-tests the serve image with `make images IMAGES=serve image-smoke-serve`
(.ci/run). The train image takes several minutes and about 3 GB more, so it is built and tested
outside CI: `make images image-smoke`, or `pytest -m slow tests/test_images.py` (root, buildah
and mmdebstrap needed).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PATH = ROOT / "infra" / "images" / "smoke.py"


def load_smoke():
    spec = importlib.util.spec_from_file_location("polytask_image_smoke", SMOKE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = load_smoke()


def test_the_smoke_test_runs_the_image_cmd_on_loopback_only() -> None:
    cmd = ["bentoml", "serve", "serving.service:Polytask", "--host", "0.0.0.0", "--port", "3000"]
    assert smoke.serving_command(cmd, 41234) == [*cmd[:4], "127.0.0.1", "--port", "41234"]
    # An image that does not bind every interface itself is not what Kubernetes needs.
    for broken in (cmd[:3] + cmd[5:], [*cmd[:4], "127.0.0.1", *cmd[5:]]):
        with pytest.raises(smoke.SmokeError, match="--host 0.0.0.0"):
            smoke.serving_command(broken, 41234)


def test_the_smoke_test_uses_the_images_the_manifests_name() -> None:
    names = {
        c["image"]
        for path in (ROOT / "infra" / "k8s").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc
        for c in _containers(doc)
    }
    for target in ("serve", "train"):
        tag = smoke.image_tag(target)
        assert tag.startswith("localhost/") and tag.removeprefix("localhost/") in names


def _containers(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "containers":
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _containers(item)


def test_a_started_process_group_is_always_stopped(tmp_path: Path) -> None:
    """What the smoke test does to a server at the end: its whole process group goes, also
    children that ignore SIGTERM."""
    log = tmp_path / "log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process = smoke.Process(popen, log)
    time.sleep(0.5)
    members = [p for p in smoke._pids() if smoke._session_of(p) == popen.pid]
    assert len(members) >= 3  # the shell and both sleeps
    process.stop(grace=1)
    assert popen.poll() is not None
    time.sleep(0.2)
    alive = [p for p in members if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
    assert alive == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_the_serve_image_command_needs_no_training_code(tmp_path, monkeypatch, capsys) -> None:
    """`polytask-serving` (serving/cli.py): the serve image's entry point; loopback by default,
    the store's message and status 2 when there is no model, and nothing from pipeline/."""
    import tomllib

    from conftest import use_bentoml_home

    from serving import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["polytask-serving"] == "serving.cli:main"
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 3000)
    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    monkeypatch.setenv("POLYTASK_MODEL_NAME", "polytask-tiny")
    with use_bentoml_home(tmp_path / "bentoml"):
        assert cli.main(["predict", "good great film"]) == 2
    assert "no model named 'polytask-tiny'" in capsys.readouterr().err
    code = "import sys, serving.cli, serving.commands; sys.exit(any(m.startswith('pipeline') for m in sys.modules))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_the_train_image_builds_and_trains_exports_and_starts_ray() -> None:
    """`make images IMAGES=train` + `make image-smoke-train`: about 5-10 minutes here."""
    assert os.geteuid() == 0, "buildah builds need root here"
    subprocess.run([ROOT / "infra" / "images" / "build.sh", "train"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, SMOKE_PATH, "train"], check=True, cwd=ROOT)
