"""The scheduler against a real two-node Ray cluster on loopback, with Ray's token auth.

The cluster: `ray start --head` plus a second node joined with `ray start --address` (1 CPU
each, every port chosen free, its own --temp-dir and HOME so that the token Ray generates
lands in a test directory, not in ~/.ray). Teardown stops only what this module started (the
two `ray start --block` process groups, then any process naming our temp dir): `ray stop`
would stop every Ray cluster on the machine.

The scheduler runs as a subprocess (`polytask schedule run`) on a short smoke entrypoint with
an every-minute cron; its clock is a file the test advances, so five ticks take seconds, not
five minutes. Job submissions are real.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.jobs.schedule import STATE_FILE
from pipeline.jobs.submit import polytask_command, tick_run_name

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
T0 = dt.datetime(2026, 1, 1, 0, 0, tzinfo=dt.UTC)
JOB_S = 6  # the smoke job's length: long enough that the next tick reliably finds it running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports every node opens; the defaults (e.g. agent 52365) would clash between our two
    nodes and with other clusters on this machine."""
    out = []
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ):
        out += [flag, str(_free_port())]
    return out


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict]:
    """Two nodes on loopback; yields the dashboard URL, the token and the env to use it."""
    import psutil
    import requests

    tmp = Path(tempfile.mkdtemp(prefix="ptray", dir="/tmp"))  # short: socket paths
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(home)
    gcs, dash = _free_port(), _free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    common += ["--disable-usage-stats"]
    started = []
    # Ray's own setup: `ray get-auth-token --generate` writes ~/.ray/auth_token, and
    # `ray start --head` then turns token auth on (without a token it starts unauthenticated).
    subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, check=True, timeout=60, capture_output=True
    )
    token = (home / ".ray" / "auth_token").read_text().strip()
    try:
        head = subprocess.Popen(
            [RAY, "start", "--head", *common, "--port", str(gcs), "--temp-dir", str(tmp)]
            + ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
            + ["--ray-client-server-port", str(_free_port()), *_node_ports()],
            env=env,
            start_new_session=True,
            stdout=(tmp / "head.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        started.append(head)
        url = f"http://127.0.0.1:{dash}"
        # Any HTTP answer means the dashboard is up; a 401 without the token means auth is on.
        answer = _wait(
            lambda: requests.get(f"{url}/api/version", timeout=2).status_code, 90, "the dashboard"
        )
        assert answer == 401, f"the dashboard answered {answer} without a token: auth is off"
        worker = subprocess.Popen(
            [RAY, "start", "--address", f"127.0.0.1:{gcs}", *common, *_node_ports()],
            env={**env, "RAY_AUTH_MODE": "token"},  # a joining node is told, not detected
            start_new_session=True,
            stdout=(tmp / "worker.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        started.append(worker)
        headers = {"Authorization": f"Bearer {token}"}

        def two_alive() -> bool:
            nodes = requests.get(f"{url}/api/v0/nodes", headers=headers, timeout=5).json()
            alive = [n for n in nodes["data"]["result"]["result"] if n["state"] == "ALIVE"]
            return len(alive) == 2

        # Generous: a loaded 2-core CI machine can take a while to start the second raylet.
        try:
            _wait(two_alive, 120, "two ALIVE nodes")
        except TimeoutError as err:
            logs = "".join(
                f"\n--- {name} (last lines) ---\n"
                + "\n".join((tmp / name).read_text(errors="replace").splitlines()[-15:])
                for name in ("head.log", "worker.log")
            )
            raise TimeoutError(f"{err}{logs}") from None
        yield {"url": url, "token": token, "env": env, "tmp": tmp}
    finally:
        for proc in reversed(started):
            _stop_group(proc)
        for proc in psutil.process_iter(["cmdline"]):  # stragglers of *this* cluster only
            if any(str(tmp) in arg for arg in proc.info["cmdline"] or []):
                proc.kill()
        if os.environ.get("POLYTASK_KEEP_RAY_LOGS") is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _client(cluster: dict):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(
        cluster["url"], headers={"Authorization": f"Bearer {cluster['token']}"}
    )


def test_submit_without_token_fails_with_a_clear_401_message(ray_cluster, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    env = {**ray_cluster["env"], "HOME": str(tmp_path)}  # no ~/.ray/auth_token here
    out = subprocess.run(
        [*polytask_command(), "submit", str(cfg), "--address", ray_cluster["url"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "token authentication" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr


def test_submit_starts_retrain_with_this_environments_polytask(ray_cluster, tiny_config_file):
    """The job starts with the absolute venv `polytask` (the cluster's PATH python would fail
    at once with 'No module named pipeline'); stopped once running, training is not the point."""
    out = subprocess.run(
        [*polytask_command(), "submit", str(tiny_config_file), "--address", ray_cluster["url"]],
        env=ray_cluster["env"],  # HOME holds the token Ray generated: read as ~/.ray/auth_token
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    run_name = out.stdout.split("submitted Ray Job ")[1].split()[0]
    assert run_name.startswith("tiny-")
    client = _client(ray_cluster)
    info = client.get_job_info(run_name)
    assert info.entrypoint.startswith(polytask_command()[0])
    assert f"--run-name {run_name}" in info.entrypoint
    _wait(lambda: str(client.get_job_status(run_name)) != "PENDING", 60, "the job to start")
    time.sleep(2)
    assert str(client.get_job_status(run_name)) in ("RUNNING", "SUCCEEDED"), client.get_job_logs(
        run_name
    )
    client.stop_job(run_name)


def _rows(state_dir: Path) -> dict[str, tuple[str, str | None]]:
    """tick -> (state, submission id), read as `polytask schedule status` reads it."""
    with sqlite3.connect(state_dir / STATE_FILE) as db:
        rows = db.execute("SELECT tick, state, submission_id FROM ticks ORDER BY tick")
        return {tick: (state, sid) for tick, state, sid in rows}


def test_five_ticks_one_submission_or_skip_each_and_a_restart_submits_nothing_twice(
    ray_cluster, tmp_path
):
    schedule_file = tmp_path / "smoke.yaml"
    job = f"{sys.executable} -c 'import time; time.sleep({JOB_S})'"
    schedule_file.write_text(
        yaml.safe_dump({"schedules": [{"name": "smoke", "cron": "* * * * *", "entrypoint": job}]})
    )
    clock, state_dir, log = tmp_path / "now", tmp_path / "state", tmp_path / "scheduler.log"
    ticks = [T0 + dt.timedelta(minutes=i) for i in range(5)]
    keys = [t.isoformat() for t in ticks]

    def set_clock(tick: dt.datetime) -> None:
        clock.write_text((tick + dt.timedelta(seconds=5)).isoformat())

    def start_scheduler() -> subprocess.Popen:
        cmd = [*polytask_command(), "schedule", "run", str(schedule_file)]
        cmd += ["--address", ray_cluster["url"], "--state-dir", str(state_dir)]
        cmd += ["--poll", "0.5", "--clock-file", str(clock)]
        return subprocess.Popen(
            cmd, env=ray_cluster["env"], stdout=log.open("a"), stderr=subprocess.STDOUT
        )

    def state(i: int) -> str | None:
        return _rows(state_dir).get(keys[i], (None, None))[0]

    def decided(i: int) -> bool:
        return state(i) not in (None, "submitting")

    started = time.monotonic()
    set_clock(ticks[0])
    scheduler = start_scheduler()
    try:
        _wait(lambda: decided(0), 60, "tick 0")
        set_clock(ticks[1])  # job 0 still pending/running: a skip
        _wait(lambda: decided(1), 30, "tick 1")
        _wait(lambda: state(0) == "SUCCEEDED", 60, "job 0 to succeed")
        set_clock(ticks[2])
        _wait(lambda: decided(2), 30, "tick 2")

        # Kill the scheduler, and rewind tick 2 to "submitting" as if it had died between
        # submit_job and the record: the restarted one must find job 2, not submit it again.
        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait(10)
        with sqlite3.connect(state_dir / STATE_FILE) as db:
            db.execute("UPDATE ticks SET state = 'submitting' WHERE tick = ?", (keys[2],))
        scheduler = start_scheduler()
        _wait(lambda: decided(2), 60, "the restarted scheduler to reconcile tick 2")
        _wait(lambda: state(2) == "SUCCEEDED", 60, "job 2 to succeed")
        set_clock(ticks[3])
        _wait(lambda: decided(3), 30, "tick 3")
        set_clock(ticks[4])  # job 3 still pending/running: a skip
        _wait(lambda: decided(4), 30, "tick 4")
        _wait(lambda: state(3) == "SUCCEEDED", 60, "job 3 to succeed")
    finally:
        scheduler.send_signal(signal.SIGINT)
        scheduler.wait(20)
    elapsed = time.monotonic() - started

    rows = _rows(state_dir)
    assert list(rows) == keys, "exactly one record per tick"
    assert [s for s, _ in rows.values()] == [
        "SUCCEEDED",
        "skipped",
        "SUCCEEDED",
        "SUCCEEDED",
        "skipped",
    ], log.read_text()
    expected_ids = [tick_run_name("smoke", ticks[i]) for i in (0, 2, 3)]
    assert [sid for _, sid in rows.values() if sid] == expected_ids

    # The cluster's own view: each tick's job exactly once, nothing submitted twice.
    on_cluster = [
        j.submission_id
        for j in _client(ray_cluster).list_jobs()
        if j.submission_id.startswith("smoke-")
    ]
    assert sorted(on_cluster) == sorted(expected_ids)
    assert "not submitting again" in log.read_text()

    status = subprocess.run(
        [*polytask_command(), "schedule", "status", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert status.count("SUCCEEDED") == 3 and "skips: smoke=2" in status
    print(status)
    print(f"five ticks with a restart: {elapsed:.0f}s")
