"""The retraining CronJob's submit script (infra/k8s/cronjob-retrain.yaml), run with bash
against a fake `ray` CLI and a fake `ray.job_submission`: the Ray job is stopped with the pod,
and only a job that SUCCEEDED makes the Kubernetes Job succeed (session 24 review: `ray job
submit` left the job running when the pod was killed, and a STOPPED job exited 0)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

FAKE_RAY = """#!/bin/bash
echo "$*" >> "$FAKE_LOG"
if [ "$1 $2" = "job submit" ]; then
  touch "$FAKE_DIR/submitted"
  sleep "${FAKE_RUN_S:-0}"
fi
"""

FAKE_CLIENT = """import os


class JobSubmissionClient:
    def get_job_status(self, job_id):
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(f"status {job_id}\\n")
        return os.environ["FAKE_STATUS"]
"""


def script() -> str:
    text = (ROOT / "infra/k8s/cronjob-retrain.yaml").read_text()
    spec = yaml.safe_load(text)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["/bin/bash", "-c"]
    return container["args"][0]


def start(tmp_path: Path, status: str, run_s: float) -> tuple[subprocess.Popen, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)  # with the fake ray package below
    package = tmp_path / "lib" / "ray"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "job_submission.py").write_text(FAKE_CLIENT)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path / "lib"),
        "FAKE_LOG": str(log),
        "FAKE_DIR": str(tmp_path),
        "FAKE_STATUS": status,
        "FAKE_RUN_S": str(run_s),
        "RAY_ADDRESS": "http://head:8265",
    }
    # Output to a file, not a pipe: the job's process outlives the script when it is stopped
    # (in a pod, the container's end takes it along), and would hold a pipe open.
    out = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen(
        ["/bin/bash", "-c", script()],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def finish(proc: subprocess.Popen, tmp_path: Path) -> str:
    try:
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the fake job's leftover `sleep`
    return (tmp_path / "out.txt").read_text()


@pytest.mark.parametrize(("status", "rc"), [("SUCCEEDED", 0), ("STOPPED", 1), ("FAILED", 1)])
def test_only_a_job_that_succeeded_succeeds(tmp_path, status, rc):
    proc, log = start(tmp_path, status, run_s=0)
    out = finish(proc, tmp_path)
    assert proc.returncode == rc, out
    calls = log.read_text().splitlines()
    assert calls[0].startswith("job submit --submission-id polytask-retrain-")
    assert " -- polytask retrain /app/configs/senteval6.yaml " in calls[0]
    job_id = calls[0].split()[3]
    assert calls[1] == f"status {job_id}"


def test_a_stopped_pod_stops_its_ray_job(tmp_path):
    proc, log = start(tmp_path, "RUNNING", run_s=60)
    deadline = time.monotonic() + 30
    while not (tmp_path / "submitted").exists():
        assert time.monotonic() < deadline, "never submitted"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # what Kubernetes sends the container's PID 1
    out = finish(proc, tmp_path)
    assert proc.returncode == 143, out
    calls = log.read_text().splitlines()
    job_id = calls[0].split()[3]
    assert f"job stop {job_id}" in calls, calls
