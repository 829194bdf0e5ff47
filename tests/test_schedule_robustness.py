"""The scheduler when the Ray dashboard misbehaves, fast tier (docs/review: session 24, #1-#6
and #12): a dashboard that never answers (every call has a deadline, threads stay bounded),
a refused submit (retried with backoff within the grace), a submit that fails after Ray created
the job (looked up, recorded as submitted), two schedulers on one state directory (the second
refuses to start), a job that never ends (stopped after max_run_hours), a pass later than the
grace (recorded `missed`; bad --poll/--grace refused), and a 5xx whose text holds "404".

The cluster is a fake job client with a fake clock, as in tests/test_schedule.py, or for the
deadlines a fake dashboard on loopback spoken to by Ray's own JobSubmissionClient."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_schedule import FakeClock

from pipeline.jobs import schedule as sched
from pipeline.jobs.schedule import (
    Schedule,
    ScheduleError,
    Scheduler,
    StateStore,
    check_timing,
    load_schedules,
    scheduler_lock,
)
from pipeline.jobs.submit import (
    BoundedJobClient,
    RayCallTimeout,
    SubmitError,
    connect,
    http_status,
    job_missing,
    submit,
    tick_run_name,
)

T0 = dt.datetime(2026, 11, 22, 2, 0, tzinfo=dt.UTC)
REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeCluster:
    """The Ray job server: duplicate ids refused (400), unknown ids 404, jobs running `job_s`
    seconds of the fake clock unless stopped. Faults are injected per call:
    `submit_faults` / `info_faults` are lists of "refuse", "create_then_timeout", "error500",
    "hang" (blocks until `release` is set), consumed one per call (empty: answer normally)."""

    def __init__(self, clock: FakeClock, job_s: float = 90.0):
        self.clock = clock
        self.job_s = job_s
        self.jobs: dict[str, dt.datetime] = {}
        self.stopped: dict[str, dt.datetime] = {}
        self.submit_calls: list[tuple[str, dt.datetime]] = []
        self.submit_faults: list[str] = []
        self.info_faults: list[str] = []
        self.stop_faults: list[str] = []
        self.hang_submit_of: set[str] = set()  # schedule names whose submits always hang
        self.release = threading.Event()

    def _hang(self) -> None:
        assert self.release.wait(60), "a hung call was never released"

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str:
        assert submission_id is not None
        self.submit_calls.append((submission_id, self.clock.now()))
        if submission_id.split("-")[0] in self.hang_submit_of:
            self._hang()
        fault = self.submit_faults.pop(0) if self.submit_faults else None
        if fault == "refuse":
            raise ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:8265.")
        if fault == "hang":
            self._hang()
        if submission_id in self.jobs:
            raise RuntimeError(f"Request failed with status code 400: {submission_id} exists.")
        self.jobs[submission_id] = self.clock.now()
        if fault == "create_then_timeout":
            raise TimeoutError("read timed out")
        return submission_id

    def status(self, job_id: str) -> str:
        if job_id in self.stopped:
            return "STOPPED"
        done = self.clock.now() >= self.jobs[job_id] + dt.timedelta(seconds=self.job_s)
        return "SUCCEEDED" if done else "RUNNING"

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        fault = self.info_faults.pop(0) if self.info_faults else None
        if fault == "hang":
            self._hang()
        if fault == "error500":
            raise RuntimeError(f"Request failed with status code 500: internal error for {job_id}")
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        start, status = self.jobs[job_id], self.status(job_id)
        end = self.stopped.get(job_id, start + dt.timedelta(seconds=self.job_s))
        return SimpleNamespace(
            status=status,
            start_time=int(start.timestamp() * 1000),
            end_time=int(end.timestamp() * 1000) if status != "RUNNING" else None,
            message="",
        )

    def stop_job(self, job_id: str) -> bool:
        fault = self.stop_faults.pop(0) if self.stop_faults else None
        if fault == "error500":
            raise RuntimeError("Request failed with status code 500: try later")
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        self.stopped[job_id] = self.clock.now()
        return True

    def running(self) -> list[str]:
        return [j for j in self.jobs if self.status(j) == "RUNNING"]


def _schedule(name: str = "nightly", cron: str = "0 2 * * *", **kw) -> Schedule:
    return Schedule(name=name, cron=cron, entrypoint="echo {run_name}", **kw)


def _scheduler(tmp_path, clock, client, schedules=None, grace_s=120.0) -> Scheduler:
    store = StateStore(tmp_path / "state")
    return Scheduler(schedules or [_schedule()], client, store, clock, grace_s=grace_s)


def _states(scheduler: Scheduler) -> list[tuple[str, str]]:
    return [(r.tick[11:16], r.state) for r in scheduler.store.records()]


# --- 1. every call to the dashboard has a deadline ------------------------------------------


def test_a_submit_that_never_answers_is_abandoned_and_the_other_schedules_go_on(tmp_path, caplog):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock)
    cluster.hang_submit_of = {"a"}
    client = BoundedJobClient(cluster, timeout_s=0.5)
    scheduler = _scheduler(tmp_path, clock, client, [_schedule("a"), _schedule("b")])
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="pipeline.jobs.schedule"):
            scheduler.step()
        assert time.monotonic() - started < 20  # generous: the deadline is 0.5 s
        a, b = scheduler.store.records()
        assert (a.schedule, a.state, a.attempts) == ("a", "submit_failed", 1)
        assert "timed out: no answer from the Ray dashboard to submit_job(" in a.outcome
        assert "within 0.5 s" in a.outcome and "retrying at" in a.outcome
        assert (b.schedule, b.state) == ("b", "PENDING")
        assert "timed out" in caplog.text
    finally:
        cluster.release.set()


def test_a_refresh_that_never_answers_keeps_the_run_and_the_pass_goes_on(tmp_path, caplog):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock, job_s=3600)
    client = BoundedJobClient(cluster, timeout_s=0.5)
    scheduler = _scheduler(tmp_path, clock, client, [_schedule("a", "0 * * * *")])
    try:
        scheduler.step()
        cluster.info_faults = ["hang"]
        clock.t = T0 + dt.timedelta(hours=1, seconds=5)
        with caplog.at_level(logging.WARNING, logger="pipeline.jobs.schedule"):
            scheduler.step()
        # the run keeps its last known state (never refreshed since its submit) and blocks
        assert _states(scheduler) == [("02:00", "PENDING"), ("03:00", "skipped")]
        assert "cannot refresh job" in caplog.text and "timed out" in caplog.text
    finally:
        cluster.release.set()


def test_abandoned_calls_are_bounded_and_fail_at_once_past_the_bound():
    release = threading.Event()
    calls = []

    class Hanging:
        def get_job_info(self, job_id):
            calls.append(job_id)
            release.wait(60)
            return "answer"

    client = BoundedJobClient(Hanging(), timeout_s=0.2, max_pending=2)
    try:
        for i in range(2):
            with pytest.raises(RayCallTimeout):
                client.get_job_info(f"j{i}")
        started = time.monotonic()
        for i in range(2, 6):
            with pytest.raises(RayCallTimeout, match="not sent: 2 earlier calls"):
                client.get_job_info(f"j{i}")
        assert time.monotonic() - started < 0.5 * 4  # refused without waiting
        assert calls == ["j0", "j1"] and client.pending == 2
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while client.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.pending == 0
    assert client.get_job_info("again") == "answer"


class _Dashboard:
    """A fake Ray dashboard on loopback: /api/version answers (or hangs), POST /api/jobs/
    hangs until released."""

    def __init__(self, hang_version: bool = False):
        self.release = threading.Event()
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, obj: object) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if hang_version:
                    outer.release.wait(60)
                self._json({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})

            def do_POST(self):
                outer.posts += 1
                outer.release.wait(60)
                self._json({"submission_id": "x", "job_id": "x"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for env in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def dashboard(no_token) -> Iterator[_Dashboard]:
    d = _Dashboard()
    yield d
    d.close()


def test_rays_client_submit_to_a_silent_dashboard_times_out(dashboard):
    client = connect(dashboard.url, timeout_s=1)
    started = time.monotonic()
    with pytest.raises(RayCallTimeout, match=r"submit_job\(run-1\) within 1 s"):
        submit(client, "echo hi", "run-1")
    assert time.monotonic() - started < 20
    assert dashboard.posts == 1
    # The abandoned request ends on its own too (Ray's requests get the same timeout).
    deadline = time.monotonic() + 20
    while client.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.pending == 0


def test_connect_to_a_dashboard_that_never_answers_fails_with_a_clear_error(no_token):
    silent = _Dashboard(hang_version=True)
    try:
        started = time.monotonic()
        with pytest.raises(SubmitError, match="did not answer within 1 s"):
            connect(silent.url, timeout_s=1)
        assert time.monotonic() - started < 20
    finally:
        silent.close()


# --- 2. a failed submit is retried within the grace ------------------------------------------


def test_a_refused_submit_is_retried_with_backoff_within_the_grace(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock)
    cluster.submit_faults = ["refuse", "refuse"]
    scheduler = _scheduler(tmp_path, clock, cluster)
    for _ in range(6):  # a pass every 5 s
        scheduler.step()
        clock.sleep(5)
    run = tick_run_name("nightly", T0)
    assert list(cluster.jobs) == [run]
    # attempt 1 at +5 s, then backoff 5 s (attempt 2 at +10 s), then 10 s (attempt 3 at +20 s)
    assert [(sid, (t - T0).seconds) for sid, t in cluster.submit_calls] == [
        (run, 5),
        (run, 10),
        (run, 20),
    ]
    (rec,) = scheduler.store.records()
    assert rec.state == "RUNNING" and rec.attempts == 3
    assert rec.outcome == "submitted on attempt 3"


def test_a_submit_failing_through_the_grace_is_given_up_and_says_so(tmp_path, caplog):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock)
    cluster.submit_faults = ["refuse"] * 100
    scheduler = _scheduler(tmp_path, clock, cluster, grace_s=60)
    with caplog.at_level(logging.ERROR, logger="pipeline.jobs.schedule"):
        for _ in range(30):  # 150 s of passes, the grace is 60 s
            scheduler.step()
            clock.sleep(5)
    assert cluster.jobs == {}
    assert all((t - T0).total_seconds() <= 60 for _, t in cluster.submit_calls)
    (rec,) = scheduler.store.records()
    n = len(cluster.submit_calls)
    assert rec.state == "submit_failed" and rec.attempts == n and n >= 3
    assert rec.outcome.startswith(f"gave up after {n} attempt(s), grace of 60 s over; last ")
    assert "Failed to connect" in rec.outcome
    assert caplog.text.count("gave up") == 1


def test_a_retry_after_a_restart_continues_the_attempt_count(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock)
    cluster.submit_faults = ["refuse"]
    first = _scheduler(tmp_path, clock, cluster)
    first.step()
    first.store.close()
    clock.sleep(2)
    restarted = _scheduler(tmp_path, clock, cluster)
    restarted.step()
    (rec,) = restarted.store.records()
    assert rec.state == "PENDING" and rec.attempts == 2
    assert list(cluster.jobs) == [tick_run_name("nightly", T0)]


# --- 3. an ambiguous submit failure: the job is looked up -------------------------------------


def test_a_submit_that_fails_after_ray_created_the_job_is_recorded_as_submitted(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock, job_s=3 * 3600)
    scheduler = _scheduler(tmp_path, clock, cluster, [_schedule(cron="0 * * * *")])
    cluster.submit_faults = ["create_then_timeout"]
    scheduler.step()
    (rec,) = scheduler.store.records()
    assert rec.state == "RUNNING" and "submitted (its submit reported timed out" in rec.outcome
    clock.t = T0 + dt.timedelta(hours=1, seconds=5)
    scheduler.step()
    assert cluster.running() == [tick_run_name("nightly", T0)]  # never two at once
    assert _states(scheduler) == [("02:00", "RUNNING"), ("03:00", "skipped")]


def test_an_unresolved_failed_submit_is_settled_before_the_next_tick(tmp_path):
    """The job was created, and looking it up failed too: the tick stays open and is asked
    about again; the next tick is not submitted while that is unknown."""
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock, job_s=3 * 3600)
    scheduler = _scheduler(tmp_path, clock, cluster, [_schedule(cron="0 * * * *")], grace_s=60)
    cluster.submit_faults = ["create_then_timeout"]
    cluster.info_faults = ["error500"]
    scheduler.step()
    (rec,) = scheduler.store.records()
    assert rec.state == "submit_failed" and "whether the job exists is unknown" in rec.outcome
    clock.t = T0 + dt.timedelta(hours=1, seconds=5)
    cluster.info_faults = ["error500"]  # settling it fails: the 03:00 tick must wait
    scheduler.step()
    assert _states(scheduler) == [("02:00", "submit_failed"), ("03:00", "skipped")]
    assert "may be running" in scheduler.store.records()[1].outcome
    clock.sleep(10)
    scheduler.step()  # the cluster answers: the 02:00 job exists, recorded as submitted
    assert _states(scheduler)[0] == ("02:00", "RUNNING")
    assert cluster.running() == [tick_run_name("nightly", T0)]


def test_a_duplicate_refused_retry_finds_the_job_it_created(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock)
    cluster.submit_faults = ["create_then_timeout"]
    cluster.info_faults = ["error500"]
    scheduler = _scheduler(tmp_path, clock, cluster)
    scheduler.step()
    clock.sleep(10)
    scheduler.step()  # retry -> 400 exists -> looked up -> recorded
    (rec,) = scheduler.store.records()
    assert rec.state == "RUNNING" and rec.attempts == 2
    assert len(cluster.jobs) == 1


# --- 4. one scheduler per state directory ---------------------------------------------------


HOLD = """
import sys, time
from pipeline.jobs.schedule import scheduler_lock
with scheduler_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_a_second_scheduler_on_one_state_dir_fails_at_once_naming_the_holder(tmp_path, lock_holder):
    with pytest.raises(ScheduleError) as info, scheduler_lock(tmp_path / "state"):
        pass
    msg = str(info.value)
    assert str(tmp_path / "state" / sched.LOCK_FILE) in msg
    assert f"pid {lock_holder.pid} on " in msg and "another scheduler" in msg
    lock_holder.kill()  # the kernel releases the lock of a killed holder
    lock_holder.wait(10)
    with scheduler_lock(tmp_path / "state") as path:
        assert path.read_text().startswith(f"pid {os.getpid()} on ")


def test_schedule_run_refuses_a_locked_state_dir_with_exit_2(
    tmp_path, lock_holder, monkeypatch, capsys
):
    from pipeline.cli import main

    ran = []
    monkeypatch.setattr("pipeline.jobs.submit.connect", lambda *a, **kw: object())
    monkeypatch.setattr(Scheduler, "run", lambda self, poll_s: ran.append(poll_s))
    schedule_file = tmp_path / "s.yaml"
    schedule_file.write_text(
        yaml.safe_dump({"schedules": [{"name": "a", "cron": "0 2 * * *", "entrypoint": "x"}]})
    )
    rc = main(["schedule", "run", str(schedule_file), "--state-dir", str(tmp_path / "state")])
    assert rc == 2 and ran == []
    err = capsys.readouterr().err
    assert "another scheduler is running" in err and f"pid {lock_holder.pid}" in err


# --- 5. a job that never ends ---------------------------------------------------------------


def test_a_run_past_max_run_hours_is_stopped_and_the_next_tick_runs(tmp_path, caplog):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock, job_s=10**9)  # never ends
    scheduler = _scheduler(tmp_path, clock, cluster)  # daily, default max_run_hours (12)
    scheduler.step()
    clock.t = T0 + dt.timedelta(hours=11)
    scheduler.step()
    assert cluster.stopped == {}
    clock.t = T0 + dt.timedelta(days=1, seconds=5)
    with caplog.at_level(logging.ERROR, logger="pipeline.jobs.schedule"):
        scheduler.step()
    first = tick_run_name("nightly", T0)
    assert list(cluster.stopped) == [first]
    assert _states(scheduler) == [("02:00", "timed_out"), ("02:00", "PENDING")]
    rec = scheduler.store.records()[0]
    assert "timed out: still RUNNING after 24.0 h (max_run_hours 12)" in rec.outcome
    assert "stop_job" in rec.outcome and "timed out" in caplog.text
    assert cluster.running() == [tick_run_name("nightly", T0 + dt.timedelta(days=1))]


def test_a_run_that_cannot_be_stopped_keeps_blocking_and_is_stopped_later(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    cluster = FakeCluster(clock, job_s=10**9)
    scheduler = _scheduler(tmp_path, clock, cluster, [_schedule(max_run_hours=1)])
    scheduler.step()
    clock.t = T0 + dt.timedelta(hours=2)
    cluster.stop_faults = ["error500"]
    scheduler.step()
    assert _states(scheduler) == [("02:00", "RUNNING")]
    clock.sleep(10)
    scheduler.step()
    assert _states(scheduler) == [("02:00", "timed_out")]


def test_max_run_hours_is_validated_and_can_be_turned_off(tmp_path, caplog):
    path = tmp_path / "s.yaml"
    entry = {"name": "a", "cron": "0 2 * * *", "entrypoint": "x"}
    path.write_text(yaml.safe_dump({"schedules": [{**entry, "max_run_hours": 0}]}))
    with pytest.raises(ScheduleError, match="schedules.0.max_run_hours"):
        load_schedules(path)
    path.write_text(yaml.safe_dump({"schedules": [{**entry, "max_run_hours": None}]}))
    (s,) = load_schedules(path)
    assert s.max_run_hours is None
    assert _schedule().max_run_hours == sched.DEFAULT_MAX_RUN_HOURS == 12

    clock = FakeClock(T0)
    scheduler = _scheduler(tmp_path, clock, FakeCluster(clock), [s])
    scheduler.step = lambda: (_ for _ in ()).throw(KeyboardInterrupt)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        scheduler.run(poll_s=1)
    assert "max_run_hours is null" in caplog.text


# --- 6. a late pass records the tick; bad --poll/--grace are refused -------------------------


def test_a_pass_later_than_the_grace_records_the_tick_as_missed(tmp_path, caplog):
    clock = FakeClock(T0 - dt.timedelta(minutes=2))  # --poll 300, --grace 120
    cluster = FakeCluster(clock)
    scheduler = _scheduler(tmp_path, clock, cluster)
    with caplog.at_level(logging.WARNING, logger="pipeline.jobs.schedule"):
        for _ in range(3):
            scheduler.step()
            clock.sleep(300)
    assert cluster.jobs == {}
    (rec,) = scheduler.store.records()
    assert rec.tick == T0.isoformat() and rec.state == "missed"
    assert "came 180 s after the tick, beyond the grace of 120 s" in rec.outcome
    assert caplog.text.count("missed") == 1


def test_a_tick_due_before_the_scheduler_started_is_not_recorded(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(hours=5))
    scheduler = _scheduler(tmp_path, clock, FakeCluster(clock))
    scheduler.step()
    assert scheduler.store.records() == []


@pytest.mark.parametrize(
    ("poll", "grace", "ray_timeout", "message"),
    [
        (10, 0, 30, "--grace must be > 0"),
        (10, -1, 30, "--grace must be > 0"),
        (300, 120, 30, "--poll (300 s) must be shorter than --grace (120 s)"),
        (120, 120, 30, "must be shorter than --grace"),
        (0, 120, 30, "--poll must be > 0"),
        (10, 120, 0, "--ray-timeout must be > 0"),
    ],
)
def test_schedule_run_refuses_bad_intervals_before_connecting(
    tmp_path, monkeypatch, capsys, poll, grace, ray_timeout, message
):
    from pipeline.cli import main

    def no_connect(*args, **kwargs):
        raise AssertionError("connected despite bad intervals")

    monkeypatch.setattr("pipeline.jobs.submit.connect", no_connect)
    schedule_file = tmp_path / "s.yaml"
    schedule_file.write_text(
        yaml.safe_dump({"schedules": [{"name": "a", "cron": "0 2 * * *", "entrypoint": "x"}]})
    )
    args = ["schedule", "run", str(schedule_file), "--state-dir", str(tmp_path / "state")]
    args += ["--poll", str(poll), "--grace", str(grace), "--ray-timeout", str(ray_timeout)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_the_scheduler_itself_refuses_a_grace_of_zero(tmp_path):
    clock = FakeClock(T0)
    with pytest.raises(ScheduleError, match="grace must be > 0"):
        _scheduler(tmp_path, clock, FakeCluster(clock), grace_s=0)
    check_timing(10, 120, 30)  # the defaults pass


# --- 12. a 5xx is not a 404, whatever its text --------------------------------------------------


def test_only_a_404_status_means_the_job_is_missing():
    missing = RuntimeError("Request failed with status code 404: Job x does not exist.")
    assert http_status(missing) == 404 and job_missing(missing)
    for text in (
        "Request failed with status code 500: internal error for nightly-20260404T020000Z-c60c8d",
        "Request failed with status code 503: upstream 404 page does not exist",
        "something about job 404",
    ):
        assert not job_missing(RuntimeError(text))
    assert http_status(SimpleNamespace(status_code=404)) == 404  # an attribute wins
    assert not job_missing(ConnectionError("Request failed with status code 404"))


def test_a_500_naming_a_404_run_does_not_mark_the_running_job_lost(tmp_path):
    t = dt.datetime(2026, 4, 4, 2, 0, 5, tzinfo=dt.UTC)
    clock = FakeClock(t)
    cluster = FakeCluster(clock, job_s=3 * 3600)
    scheduler = _scheduler(tmp_path, clock, cluster, [_schedule(cron="0 * * * *")])
    scheduler.step()
    cluster.info_faults = ["error500"]
    clock.sleep(10)
    scheduler.step()
    assert _states(scheduler) == [("02:00", "PENDING")]  # unchanged, not LOST
    clock.t = t + dt.timedelta(hours=1)
    scheduler.step()
    assert _states(scheduler) == [("02:00", "RUNNING"), ("03:00", "skipped")]
    assert len(cluster.running()) == 1


# --- the state file -----------------------------------------------------------------------------


def test_a_state_file_from_before_retries_gains_the_attempts_column(tmp_path):
    import sqlite3

    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / sched.STATE_FILE)
    db.execute(
        """CREATE TABLE ticks (
            schedule TEXT NOT NULL, tick TEXT NOT NULL, submission_id TEXT,
            state TEXT NOT NULL, submitted_at TEXT, start_time TEXT, end_time TEXT,
            duration_s REAL, outcome TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (schedule, tick))"""
    )
    db.execute("INSERT INTO ticks (schedule, tick, state) VALUES ('a', 't', 'SUCCEEDED')")
    db.commit()
    db.close()
    store = StateStore(tmp_path / "state")
    (rec,) = store.records()
    assert (rec.schedule, rec.state, rec.attempts) == ("a", "SUCCEEDED", 0)
    store.close()
