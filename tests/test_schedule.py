"""The scheduler's decisions, fast tier: cron due ticks, one submission per tick or a counted
skip, nothing submitted twice across restarts (including a crash between submit and record),
no back-fill. The Ray job server is replaced by a fake (an edge the fast tier cannot reach);
tests/test_schedule_ray.py runs the same scheduler against a real two-node cluster."""

from __future__ import annotations

import datetime as dt
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.jobs import schedule as sched
from pipeline.jobs.schedule import (
    Schedule,
    ScheduleError,
    Scheduler,
    StateStore,
    due_tick,
    format_status,
    load_schedules,
)
from pipeline.jobs.submit import (
    INSECURE_TOKEN_ENV,
    SubmitError,
    check_token_transport,
    connect,
    new_run_name,
    read_auth_token,
    retrain_entrypoint,
    tick_run_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)


class FakeClock:
    def __init__(self, now: dt.datetime):
        self.t = now

    def now(self) -> dt.datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


class FakeJobClient:
    """submit_job / get_job_info as the Ray job server answers them: duplicate submission ids
    are refused, unknown ids give a 404 RuntimeError; each job runs `job_s` seconds of the
    shared fake clock."""

    def __init__(self, clock: FakeClock, job_s: float = 90.0):
        self.clock = clock
        self.job_s = job_s
        self.jobs: dict[str, dt.datetime] = {}
        self.submitted: list[str] = []

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str:
        assert submission_id is not None
        if submission_id in self.jobs:
            raise RuntimeError(f"Request failed with status code 400: {submission_id} exists")
        self.jobs[submission_id] = self.clock.now()
        self.submitted.append(submission_id)
        return submission_id

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        start = self.jobs[job_id]
        end = start + dt.timedelta(seconds=self.job_s)
        done = self.clock.now() >= end
        return SimpleNamespace(
            status="SUCCEEDED" if done else "RUNNING",
            start_time=int(start.timestamp() * 1000),
            end_time=int(end.timestamp() * 1000) if done else None,
            message="Job finished successfully." if done else "Job is currently running.",
        )


def _schedule(name: str = "nightly", cron: str = "* * * * *") -> Schedule:
    return Schedule(name=name, cron=cron, entrypoint="echo {run_name}")


def _scheduler(tmp_path: Path, clock: FakeClock, client: FakeJobClient, **kw) -> Scheduler:
    return Scheduler([_schedule(**kw)], client, StateStore(tmp_path / "state"), clock)


# --- cron -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "now", "expected"),
    [
        ("* * * * *", T0, T0),  # a tick exactly at now is due
        ("* * * * *", T0 + dt.timedelta(seconds=59), T0),
        ("* * * * *", T0 + dt.timedelta(seconds=60), T0 + dt.timedelta(minutes=1)),
        ("*/15 * * * *", T0 + dt.timedelta(minutes=29), T0 + dt.timedelta(minutes=15)),
        ("0 2 * * *", T0, T0.replace(hour=2)),
        ("0 2 * * *", T0.replace(hour=1), T0.replace(hour=2) - dt.timedelta(days=1)),
    ],
)
def test_due_tick_is_the_latest_cron_time_at_or_before_now(cron, now, expected):
    assert due_tick(cron, now) == expected


def test_run_names_are_unique_and_tick_names_deterministic():
    assert tick_run_name("nightly", T0) == tick_run_name("nightly", T0)
    assert tick_run_name("nightly", T0) != tick_run_name("nightly", T0 + dt.timedelta(minutes=1))
    assert tick_run_name("nightly", T0) != tick_run_name("weekly", T0)
    assert re.fullmatch(r"nightly-20261122T100000Z-[0-9a-f]{6}", tick_run_name("nightly", T0))
    names = {new_run_name("senteval6") for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"senteval6-\d{8}T\d{6}Z-[0-9a-f]{6}", n) for n in names)


# --- schedule files -----------------------------------------------------------------------


def test_shipped_schedule_files_validate_and_name_their_command():
    files = sorted((REPO_ROOT / "configs" / "schedules").glob("*.yaml"))
    assert files, "configs/schedules/ has no example"
    for path in files:
        schedules = load_schedules(path)
        assert all(s.config is not None and s.config.is_file() for s in schedules)
        assert "polytask schedule run" in path.read_text().split("schedules:")[0]


def test_bad_schedule_file_reports_every_error_at_once(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "schedules": [
                    {"name": "Bad Name", "cron": "* * *", "entrypoint": "true"},
                    {"name": "ok", "cron": "* * * * *", "entrypoint": "true", "colour": 1},
                ]
            }
        )
    )
    with pytest.raises(ScheduleError) as info:
        load_schedules(path)
    msg = str(info.value)
    assert "schedules.0.name" in msg and "schedules.0.cron" in msg and "schedules.1.colour" in msg

    path.write_text(
        yaml.safe_dump(
            {
                "schedules": [
                    {"name": "a", "cron": "* * * * *", "config": "missing.yaml"},
                    {"name": "a", "cron": "* * * * *"},
                ]
            }
        )
    )
    with pytest.raises(ScheduleError) as info:
        load_schedules(path)
    msg = str(info.value)
    assert "'a' is used twice" in msg
    assert "schedules[0].config: file not found" in msg
    assert "schedules[1]: give exactly one of config, entrypoint" in msg


def test_retrain_entrypoint_uses_this_environments_polytask_and_absolute_paths(tmp_path):
    cfg = tmp_path / "c.yaml"
    args = shlex.split(retrain_entrypoint(cfg, "run-1", data_dir=tmp_path / "data"))
    assert Path(args[0]).is_absolute()
    assert args[args.index("retrain") + 1] == str(cfg.resolve())
    assert args[-4:] == ["--run-name", "run-1", "--data-dir", str((tmp_path / "data").resolve())]


def test_auth_token_is_read_like_rays_client(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert read_auth_token() == "home-token"
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert read_auth_token() == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert read_auth_token() == "env-token"


# --- the token never travels unencrypted to another machine ---------------------------------

SECRET = "s3cr3t-token-value"


class RecordingSubmissionClient:
    """Stands in for ray.job_submission.JobSubmissionClient: records what it was given."""

    made: list[tuple[str, dict | None]] = []

    def __init__(self, address: str, headers: dict | None = None, **kwargs):
        RecordingSubmissionClient.made.append((address, headers))

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str:
        return submission_id or "job"


@pytest.fixture
def recording_client(monkeypatch, tmp_path):
    """A token in RAY_AUTH_TOKEN, no address or opt-in from the environment, Ray's job client
    replaced by a recorder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)
    for env in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", INSECURE_TOKEN_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", RecordingSubmissionClient)
    RecordingSubmissionClient.made = []
    return RecordingSubmissionClient.made


@pytest.mark.parametrize(
    "address",
    [
        "http://10.0.0.5:8265",
        "10.0.0.5:8265",  # no scheme: Ray reads it as http
        "http://head.example.com:8265",
        "HTTP://head.example.com",
        "ray://10.0.0.5:10001",
        "http://[2001:db8::1]:8265",
        "http://127.0.0.1.example.com:8265",
        "http://0.0.0.0:8265",
    ],
)
def test_token_is_not_sent_unencrypted_to_another_host(address):
    with pytest.raises(SubmitError) as info:
        check_token_transport(address, "--address")
    msg = str(info.value)
    assert msg.startswith("refusing to send the Ray auth token unencrypted")
    assert "--allow-insecure-token" in msg and INSECURE_TOKEN_ENV in msg


@pytest.mark.parametrize(
    "address",
    [
        "https://head.example.com:8443",
        "https://10.0.0.5",
        "http://127.0.0.1:8265",
        "http://127.8.9.10:8265",
        "127.0.0.1:8265",
        "http://localhost:8265",
        "localhost:8265",
        "http://LOCALHOST.:8265",
        "http://[::1]:8265",
        "http://[::ffff:127.0.0.1]:8265",
        "auto",  # the cluster on this machine
    ],
)
def test_token_may_go_over_https_anywhere_and_to_loopback(address):
    check_token_transport(address, "--address")


def test_insecure_token_opt_in_warns_without_the_token(caplog):
    with caplog.at_level("WARNING", logger="pipeline.jobs.submit"):
        check_token_transport("http://10.0.0.5:8265", "--address", allow_insecure=True)
    [record] = caplog.records
    assert "unencrypted (http://) to 10.0.0.5" in record.getMessage()


def test_connect_refuses_before_any_request_and_never_shows_the_token(recording_client, caplog):
    with pytest.raises(SubmitError) as info:
        connect("http://10.0.0.5:8265")
    assert recording_client == []  # no client, so no request with the header
    assert SECRET not in str(info.value) and SECRET not in caplog.text


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_connect_sends_the_token_when_the_user_opts_in(recording_client, monkeypatch, caplog, how):
    if how == "environment":
        monkeypatch.setenv(INSECURE_TOKEN_ENV, "1")
    connect("http://10.0.0.5:8265", allow_insecure_token=how == "argument")
    assert recording_client == [("http://10.0.0.5:8265", {"Authorization": f"Bearer {SECRET}"})]
    assert "allowed by --allow-insecure-token" in caplog.text and SECRET not in caplog.text


def test_connect_over_https_or_loopback_or_without_a_token_needs_no_opt_in(
    recording_client, monkeypatch
):
    connect("https://head.example.com")
    connect("127.0.0.1:8265")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    connect("http://10.0.0.5:8265")  # nothing secret to send
    assert recording_client == [
        ("https://head.example.com", {"Authorization": f"Bearer {SECRET}"}),
        ("http://127.0.0.1:8265", {"Authorization": f"Bearer {SECRET}"}),
        ("http://10.0.0.5:8265", None),
    ]


@pytest.mark.parametrize("env", ["RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
def test_the_address_checked_is_the_one_rays_client_uses(recording_client, monkeypatch, env):
    # Ray's JobSubmissionClient replaces the address it is given with these variables.
    monkeypatch.setenv(env, "http://10.0.0.5:8265")
    with pytest.raises(SubmitError) as info:
        connect("https://head.example.com")
    assert f"(http://10.0.0.5:8265, from {env})" in str(info.value)
    assert recording_client == []


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_cli_refuses_with_exit_2_unless_allow_insecure_token(
    recording_client, tmp_path, capsys, command
):
    from pipeline.cli import main

    if command == "submit":
        args = ["submit", str(REPO_ROOT / "configs" / "senteval6.yaml")]
    else:
        schedule = tmp_path / "s.yaml"
        schedule.write_text(
            yaml.safe_dump({"schedules": [{"name": "a", "cron": "0 2 * * *", "entrypoint": "x"}]})
        )
        args = ["schedule", "run", str(schedule), "--state-dir", str(tmp_path / "state")]
    args += ["--address", "http://10.0.0.5:8265"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: refusing to send the Ray auth token unencrypted (http://) to 10.0.0.5" in err
    assert "--allow-insecure-token" in err and SECRET not in err
    assert recording_client == [] and not (tmp_path / "state").exists()
    if command == "submit":
        assert main([*args, "--allow-insecure-token"]) == 0
        assert recording_client == [("http://10.0.0.5:8265", {"Authorization": f"Bearer {SECRET}"})]


# --- the scheduler --------------------------------------------------------------------------


def test_each_tick_submits_once_or_records_a_skip_while_the_previous_run_is_active(tmp_path):
    """Every minute for five minutes, jobs taking 90 s: submit, skip, submit, skip, submit."""
    clock = FakeClock(T0)
    client = FakeJobClient(clock, job_s=90)
    scheduler = _scheduler(tmp_path, clock, client)
    for _ in range(5 * 6):  # a pass every 10 s, 10:00:00 .. 10:04:50
        scheduler.step()
        clock.sleep(10)

    recs = scheduler.store.records()
    assert [r.tick for r in recs] == [(T0 + dt.timedelta(minutes=i)).isoformat() for i in range(5)]
    assert [r.state for r in recs] == ["SUCCEEDED", "skipped", "SUCCEEDED", "skipped", "RUNNING"]
    assert client.submitted == [
        tick_run_name("nightly", T0 + dt.timedelta(minutes=i)) for i in (0, 2, 4)
    ]
    assert all(r.duration_s == 90 for r in recs if r.state == "SUCCEEDED")
    assert "still RUNNING" in recs[1].outcome
    assert scheduler.store.skip_counts() == {"nightly": 2}
    table = format_status(scheduler.store)
    assert table.count("SUCCEEDED") == 2 and "90.0s" in table and "skips: nightly=2" in table


def test_restarted_scheduler_never_submits_a_tick_twice(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=5))
    client = FakeJobClient(clock, job_s=20)
    first = _scheduler(tmp_path, clock, client)
    first.step()
    first.step()
    first.store.close()
    for _ in range(3):  # restarted three times within the same minute
        clock.sleep(10)
        restarted = _scheduler(tmp_path, clock, client)
        restarted.step()
        restarted.store.close()
    assert client.submitted == [tick_run_name("nightly", T0)]


def test_crash_between_submit_and_record_is_detected_not_resubmitted(tmp_path, monkeypatch):
    clock = FakeClock(T0)
    client = FakeJobClient(clock, job_s=20)
    crashing = _scheduler(tmp_path, clock, client)
    real_update = StateStore.update

    def die_after_submit(self, schedule, tick, **fields):
        if fields.get("state") == "PENDING":
            raise KeyboardInterrupt  # killed right after submit_job returned
        real_update(self, schedule, tick, **fields)

    monkeypatch.setattr(StateStore, "update", die_after_submit)
    with pytest.raises(KeyboardInterrupt):
        crashing.step()
    monkeypatch.setattr(StateStore, "update", real_update)
    assert crashing.store.records()[0].state == "submitting"
    crashing.store.close()

    clock.sleep(30)
    restarted = _scheduler(tmp_path, clock, client)
    restarted.step()
    assert client.submitted == [tick_run_name("nightly", T0)]
    assert restarted.store.records()[0].state == "SUCCEEDED"


def test_crash_between_record_and_submit_submits_that_tick_once(tmp_path):
    clock = FakeClock(T0 + dt.timedelta(seconds=30))
    client = FakeJobClient(clock)
    store = StateStore(tmp_path / "state")
    store.insert(
        "nightly", T0.isoformat(), "submitting", submission_id=tick_run_name("nightly", T0)
    )
    store.close()
    scheduler = _scheduler(tmp_path, clock, client)
    scheduler.step()
    scheduler.step()
    assert client.submitted == [tick_run_name("nightly", T0)]
    assert scheduler.store.records()[0].state == "RUNNING"


def test_missed_ticks_are_not_back_filled(tmp_path):
    """Down from 10:00 to 10:05: on restart only the latest tick (10:05) fires, not the others;
    an hourly tick 10 minutes old is beyond the grace and does not fire at all."""
    clock = FakeClock(T0 + dt.timedelta(minutes=5, seconds=20))
    client = FakeJobClient(clock)
    store = StateStore(tmp_path / "state")
    scheduler = Scheduler(
        [_schedule("minutely"), _schedule("hourly", "0 * * * *")], client, store, clock
    )
    scheduler.step()
    assert client.submitted == [tick_run_name("minutely", T0 + dt.timedelta(minutes=5))]
    assert [r.schedule for r in store.records()] == ["minutely"]


def test_a_failed_submit_is_recorded_and_the_scheduler_goes_on(tmp_path):
    clock = FakeClock(T0)
    client = FakeJobClient(clock)
    client.submit_job = lambda **kw: (_ for _ in ()).throw(RuntimeError("cluster is down"))
    scheduler = _scheduler(tmp_path, clock, client)
    scheduler.step()
    (rec,) = scheduler.store.records()
    assert rec.state == "submit_failed" and "cluster is down" in rec.outcome


def test_status_reads_the_state_dir_without_creating_it(tmp_path):
    assert "no scheduler state" in sched.status_report(tmp_path / "none")
    assert not (tmp_path / "none").exists()
    store = StateStore(tmp_path / "deep" / "state")
    assert store.path == tmp_path / "deep" / "state" / sched.STATE_FILE
    store.close()
    assert "(no ticks recorded yet)" in sched.status_report(tmp_path / "deep" / "state")
