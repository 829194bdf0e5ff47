"""The embedded scheduler: submit retraining as Ray Jobs on cron expressions.

    polytask schedule run configs/schedules/senteval6.yaml --address http://HEAD:8265
    polytask schedule status

Each step (every `poll_s` seconds):
  1. refresh the runs still PENDING/RUNNING (`get_job_info`): state, start, end, outcome;
     a run past its schedule's `max_run_hours` (default 12) is stopped (`stop_job`) and
     recorded `timed_out`, so that the next tick is not skipped for good;
  2. for each schedule, take its most recent due tick (the latest cron time <= now):
     - already in the state store -> nothing (a restarted scheduler never submits it again);
       a row left in `submitting` by a crash is reconciled with `get_job_info` on the
       deterministic submission id: found -> record it, not found -> submit it now;
     - the schedule's previous run still PENDING/RUNNING -> record a `skipped` tick (counted);
     - else record `submitting`, submit, record the job's state.

The tick time is the idempotency key: the store's primary key is (schedule, tick) and the
submission id is derived from it (`tick_run_name`), so even a duplicate submit would be
refused by the Ray job server.

A submit that raises is not taken at its word: the job may exist all the same (the answer was
lost, or timed out after Ray created it), so the cluster is asked by the submission id, and a
job that exists is recorded as submitted. Otherwise the tick is `submit_failed` and retried
with backoff (5 s doubling, at most 60 s; `attempts` counts them) while it is within the
grace; after that it is given up ("gave up after N attempt(s)"), once the cluster confirms the
job does not exist.

Every call to the Ray dashboard has a deadline (`--ray-timeout`, default 30 s; see
`pipeline.jobs.submit.BoundedJobClient`): a call that times out is logged and handled like any
other failure of that call, and the pass goes on with the other schedules.

Missed ticks are not back-filled: only the most recent due tick is considered, and only while
it is at most `grace_s` old (default 120 s; `--poll` must be shorter). A scheduler down across
several ticks fires the latest one on restart if it is within the grace, and none of the older
ones (logged). A tick this scheduler's own pass reached too late is recorded `missed`, with a
warning.

One scheduler per state directory: `run_schedules` holds an flock on `STATE_DIR/schedule.lock`
(released by the kernel when the process dies); a second one exits at once, naming the holder.

State: one SQLite file, `STATE_DIR/schedule.sqlite3`; every change is one transaction
(atomic, survives a kill at any point).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.jobs.submit import (
    DEFAULT_RAY_TIMEOUT_S,
    JobClient,
    RayCallTimeout,
    job_missing,
    retrain_entrypoint,
    submit,
    tick_run_name,
)

logger = logging.getLogger(__name__)

STATE_FILE = "schedule.sqlite3"
LOCK_FILE = "schedule.lock"  # flock-ed by the running scheduler, beside STATE_FILE
DEFAULT_MAX_RUN_HOURS = 12.0
RETRY_BASE_S = 5.0  # a failed submit is retried after 5, 10, 20, 40, 60, 60... s (in the grace)
RETRY_MAX_S = 60.0
GAVE_UP = "gave up"  # the outcome prefix of a submit_failed tick that is no longer retried
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ScheduleError(ValueError):
    """A schedule file that does not validate; names the file and field."""


class Schedule(BaseModel):
    """One cron-driven retraining job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique; prefixes run names and Ray submission ids")
    cron: str = Field(description="5-field cron expression, evaluated in UTC")
    config: Path | None = Field(
        default=None, description="run config for `polytask retrain` (relative to this file)"
    )
    data_dir: Path | None = Field(
        default=None, description="replaces the config's data_root (relative to this file)"
    )
    entrypoint: str | None = Field(
        default=None,
        description="a shell command run instead of retrain (smoke tests); `{run_name}` is "
        "replaced by the run name",
    )
    add_tasks: bool = Field(
        default=False,
        description="`polytask retrain --add-tasks`: add the config's tasks that the promoted "
        "model lacks to its run (training only those) instead of retraining every task",
    )
    max_run_hours: float | None = Field(
        default=DEFAULT_MAX_RUN_HOURS,
        gt=0,
        description="a run still PENDING/RUNNING this long after it started is stopped "
        "(Ray stop_job) and recorded `timed_out`, so the next tick can run; null: no limit "
        "(a run that never ends then blocks the schedule for good)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", value):
            raise ValueError("use lowercase letters, digits, '-' and '_' (it names Ray jobs)")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import CroniterBadDateError, croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"not a 5-field cron expression: {value!r}")
        # A valid expression can still match no date at all (`0 2 31 2 *`, February 31st):
        # the scheduler would then fail on it, and stop every other schedule with it.
        base = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        try:
            croniter(value, base).get_next(dt.datetime)
            croniter(value, base).get_prev(dt.datetime)
        except CroniterBadDateError:
            raise ValueError(f"{value!r} matches no date, so it would never fire") from None
        return value

    def entrypoint_for(self, run_name: str) -> str:
        if self.entrypoint is not None:
            return self.entrypoint.replace("{run_name}", run_name)
        assert self.config is not None
        return retrain_entrypoint(self.config, run_name, self.data_dir, self.add_tasks)


class ScheduleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedules: list[Schedule] = Field(min_length=1, description="the cron jobs")


def load_schedules(path: Path) -> list[Schedule]:
    """Validate a schedule file; every error is reported at once with its field path."""
    from pipeline.config import YamlFileError, load_yaml_file

    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"{path}: file not found")
    try:
        raw = load_yaml_file(path) or {}
    except YamlFileError as err:
        raise ScheduleError(f"{path}: {err.problem}") from None
    try:
        parsed = ScheduleFile.model_validate(raw)
    except ValidationError as err:
        lines = [
            f"{path}: {'.'.join(str(p) for p in e['loc'])}{_schedule_name(raw, e['loc'])}: "
            f"{e['msg']}"
            for e in err.errors()
        ]
        raise ScheduleError("\n".join(lines)) from None
    problems = []
    names = [s.name for s in parsed.schedules]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{path}: schedules: name {name!r} is used twice")
    for i, s in enumerate(parsed.schedules):
        if (s.config is None) == (s.entrypoint is None):
            problems.append(f"{path}: schedules[{i}]: give exactly one of config, entrypoint")
        if s.add_tasks and s.entrypoint is not None:
            problems.append(f"{path}: schedules[{i}].add_tasks: applies to config, not entrypoint")
        if s.config is not None:
            s.config = (path.parent / s.config).resolve()
            if not s.config.is_file():
                problems.append(f"{path}: schedules[{i}].config: file not found: {s.config}")
        if s.data_dir is not None:
            s.data_dir = (path.parent / s.data_dir).resolve()
    if problems:
        raise ScheduleError("\n".join(problems))
    return parsed.schedules


def _schedule_name(raw: object, loc: tuple) -> str:
    """' (schedule NAME)' for an error inside a named schedule entry, else ''."""
    if len(loc) < 2 or loc[0] != "schedules" or not isinstance(loc[1], int):
        return ""
    entries = raw.get("schedules") if isinstance(raw, dict) else None
    entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    return f" (schedule {name!r})" if isinstance(name, str) else ""


def due_tick(cron: str, now: dt.datetime) -> dt.datetime:
    """The most recent cron time at or before `now` (UTC, whole minutes)."""
    from croniter import croniter

    # croniter's get_prev is strictly before its base: start one second later so that a tick
    # exactly at `now` counts as due.
    tick = croniter(cron, now.astimezone(dt.UTC) + dt.timedelta(seconds=1)).get_prev(dt.datetime)
    return tick.astimezone(dt.UTC)


class Clock(Protocol):
    def now(self) -> dt.datetime: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FileClock:
    """Test clock: "now" is the ISO 8601 time written in a file (sleeping is real), so a test
    can drive a scheduler subprocess through many cron ticks in seconds."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def now(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.path.read_text().strip()).astimezone(dt.UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class TickRecord:
    schedule: str
    tick: str
    submission_id: str | None
    state: str
    submitted_at: str | None
    start_time: str | None
    end_time: str | None
    duration_s: float | None
    outcome: str
    attempts: int = 0  # submit attempts made for this tick


class StateStore:
    """Every tick the scheduler decided on: SQLite, one transaction per change."""

    def __init__(self, state_dir: Path):
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(state_dir) / STATE_FILE
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit statements
        try:
            self._create()
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise ScheduleError(
                f"{self.path}: not a usable scheduler state ({err}); move it away to start "
                "a new history"
            ) from None

    def _create(self) -> None:
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS ticks (
                schedule TEXT NOT NULL, tick TEXT NOT NULL, submission_id TEXT,
                state TEXT NOT NULL, submitted_at TEXT, start_time TEXT, end_time TEXT,
                duration_s REAL, outcome TEXT NOT NULL DEFAULT '',
                attempts INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (schedule, tick))"""
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(ticks)")}
        if "attempts" not in columns:  # a state file from before submit retries
            self.db.execute("ALTER TABLE ticks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    def get(self, schedule: str, tick: str) -> TickRecord | None:
        row = self.db.execute(
            "SELECT * FROM ticks WHERE schedule = ? AND tick = ?", (schedule, tick)
        ).fetchone()
        return TickRecord(*row) if row else None

    def insert(self, schedule: str, tick: str, state: str, **fields: object) -> None:
        cols = ["schedule", "tick", "state", *fields]
        self.db.execute(
            f"INSERT INTO ticks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            (schedule, tick, state, *fields.values()),
        )

    def update(self, schedule: str, tick: str, **fields: object) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(
            f"UPDATE ticks SET {sets} WHERE schedule = ? AND tick = ?",
            (*fields.values(), schedule, tick),
        )

    def records(self, states: Sequence[str] | None = None) -> list[TickRecord]:
        sql, args = "SELECT * FROM ticks", ()
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = tuple(states)
        return [TickRecord(*r) for r in self.db.execute(sql + " ORDER BY tick, schedule", args)]

    def skip_counts(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT schedule, COUNT(*) FROM ticks WHERE state = 'skipped' GROUP BY schedule"
        )
        return dict(rows.fetchall())


def _ms_to_iso(ms: int | None) -> str | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


def _job_missing(err: BaseException) -> bool:
    """The dashboard answered 404 for the job (by status code, never a "404" in the text)."""
    return job_missing(err)


def _describe(err: BaseException) -> str:
    """An error as recorded: a timeout says so (whatever raised it), anything else its text."""
    if isinstance(err, RayCallTimeout):
        return str(err)
    if isinstance(err, TimeoutError):
        return f"timed out: {err or type(err).__name__}"
    return str(err) or type(err).__name__


def _gave_up(rec: TickRecord) -> bool:
    return rec.outcome.startswith(GAVE_UP)


def retry_delay(attempt: int) -> float:
    """Seconds before retrying a submit after failed attempt number `attempt` (1, 2, ...):
    RETRY_BASE_S doubling per attempt, at most RETRY_MAX_S."""
    return min(RETRY_BASE_S * 2 ** (attempt - 1), RETRY_MAX_S)


def check_timing(poll_s: float, grace_s: float, ray_timeout_s: float) -> None:
    """Refuse intervals with which the scheduler would drop ticks or never answer.

    Raises:
        ScheduleError: naming the flag and what to give instead.
    """
    problems = []
    if not poll_s > 0:
        problems.append(f"--poll must be > 0 seconds (got {poll_s:g})")
    if not grace_s > 0:
        problems.append(f"--grace must be > 0 seconds (got {grace_s:g}): no tick could fire")
    elif not poll_s < grace_s:
        problems.append(
            f"--poll ({poll_s:g} s) must be shorter than --grace ({grace_s:g} s): a tick "
            "falling between two passes would otherwise be dropped"
        )
    if not ray_timeout_s > 0:
        problems.append(f"--ray-timeout must be > 0 seconds (got {ray_timeout_s:g})")
    if problems:
        raise ScheduleError("; ".join(problems))
    if ray_timeout_s >= grace_s:
        logger.warning(
            "--ray-timeout (%g s) is not shorter than --grace (%g s): a submit that times out "
            "leaves no time to retry it",
            ray_timeout_s,
            grace_s,
        )


@contextlib.contextmanager
def scheduler_lock(state_dir: Path) -> Iterator[Path]:
    """Hold the state directory for one scheduler: an exclusive flock on
    `STATE_DIR/schedule.lock`, which the kernel releases when this process ends, even by
    SIGKILL. The file keeps the holder's pid and host for the message of a second scheduler.

    Raises:
        ScheduleError: another scheduler holds it (names the lock file and its holder), or the
            file system cannot lock.
    """
    import fcntl

    Path(state_dir).mkdir(parents=True, exist_ok=True)
    path = Path(state_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            try:
                holder = path.read_text().strip() or "holder unknown"
            except OSError:
                holder = "holder unknown"
            raise ScheduleError(
                f"{path}: another scheduler is running on this state directory ({holder}); "
                "two would submit and record the same ticks. Stop it, or give this one "
                "another --state-dir"
            ) from None
        raise ScheduleError(
            f"{path}: cannot lock the scheduler state ({err}); put --state-dir on a local "
            "file system"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


class Scheduler:
    """Decides, submits and records; `step()` is one pass, `run()` loops forever."""

    def __init__(
        self,
        schedules: list[Schedule],
        client: JobClient,
        store: StateStore,
        clock: Clock,
        grace_s: float = 120.0,
    ):
        if not grace_s > 0:
            raise ScheduleError(f"grace must be > 0 seconds (got {grace_s:g}): no tick could fire")
        self.schedules = schedules
        self.client = client
        self.store = store
        self.clock = clock
        self.grace = dt.timedelta(seconds=grace_s)
        self.started = clock.now()
        self._retry_at: dict[tuple[str, str], dt.datetime] = {}
        self._noted_old: set[tuple[str, str]] = set()

    # --- the cluster's view of a job ------------------------------------------------------

    def _apply(self, rec: TickRecord, info: Any, **extra: object) -> str:
        """Copy the job's state from `info` (JobDetails) into the store; returns the state."""
        state = str(getattr(info.status, "value", info.status))
        start, end = info.start_time, info.end_time
        fields: dict[str, object] = {
            "state": state,
            "start_time": _ms_to_iso(start),
            "end_time": _ms_to_iso(end),
            **extra,
        }
        if start is not None and end is not None:
            fields["duration_s"] = round((end - start) / 1000, 3)
        if state in TERMINAL:
            message = info.message
            fields["outcome"] = state.lower() + (f": {message}" if message else "")
        if state != rec.state:
            logger.info("%s tick %s: job %s %s", rec.schedule, rec.tick, rec.submission_id, state)
        self.store.update(rec.schedule, rec.tick, **fields)
        return state

    def refresh(self, rec: TickRecord) -> str:
        """Copy the job's state from the cluster into the store; returns the state."""
        return self._apply(rec, self.client.get_job_info(rec.submission_id))

    def _refresh_active(self, rec: TickRecord) -> None:
        try:
            self.refresh(rec)
        except Exception as err:  # noqa: BLE001 - one job's problem never stops the pass
            logger.warning(
                "%s: cannot refresh job %s: %s", rec.schedule, rec.submission_id, _describe(err)
            )
            if _job_missing(err):  # the cluster forgot the job (restarted): say so
                self.store.update(rec.schedule, rec.tick, state="LOST", outcome=str(err))

    # --- one pass -------------------------------------------------------------------------

    def step(self) -> None:
        now = self.clock.now()
        for rec in self.store.records(ACTIVE):
            self._refresh_active(rec)
        self._stop_overdue(now)
        current = {s.name: due_tick(s.cron, now).isoformat() for s in self.schedules}
        for rec in self.store.records(["submitting"]):
            if current.get(rec.schedule) != rec.tick:  # an older tick left by a crash
                self._reconcile_old(rec)
        self._settle_failed(now, current)
        for schedule in self.schedules:
            try:
                self._tick(schedule, now)
            except Exception as err:  # noqa: BLE001 - the other schedules go on
                logger.error("%s: pass failed: %s", schedule.name, _describe(err), exc_info=True)

    def _reconcile_old(self, rec: TickRecord) -> None:
        try:
            self.refresh(rec)
        except Exception as err:  # noqa: BLE001 - asked again on the next pass
            if not _job_missing(err):
                logger.warning(
                    "%s tick %s: cannot tell whether %s was submitted before a restart: %s",
                    rec.schedule,
                    rec.tick,
                    rec.submission_id,
                    _describe(err),
                )
                return
            logger.info(
                "%s tick %s: never submitted; too old, not back-filled", rec.schedule, rec.tick
            )
            self.store.update(
                rec.schedule, rec.tick, state="missed", outcome="not submitted before a restart"
            )

    def _stop_overdue(self, now: dt.datetime) -> None:
        """Stop (Ray `stop_job`) every active run older than its schedule's max_run_hours and
        record it `timed_out`, so that the schedule's next tick can run."""
        limits = {s.name: s.max_run_hours for s in self.schedules}
        for rec in self.store.records(ACTIVE):
            hours = limits.get(rec.schedule)
            if hours is None:
                continue
            since = dt.datetime.fromisoformat(rec.start_time or rec.submitted_at or rec.tick)
            elapsed = now - since
            if elapsed < dt.timedelta(hours=hours):
                continue
            note = ""
            try:
                self.client.stop_job(rec.submission_id)
            except Exception as err:  # noqa: BLE001 - tried again on the next pass
                if not _job_missing(err):
                    logger.error(
                        "%s tick %s: job %s has run %s, past max_run_hours %g, and could not "
                        "be stopped (tried again next pass): %s",
                        rec.schedule,
                        rec.tick,
                        rec.submission_id,
                        _hours(elapsed),
                        hours,
                        _describe(err),
                    )
                    continue
                note = "; the cluster no longer knows the job"
            outcome = (
                f"timed out: still {rec.state} after {_hours(elapsed)} (max_run_hours "
                f"{hours:g}); stopped with Ray stop_job{note}"
            )
            self.store.update(
                rec.schedule, rec.tick, state="timed_out", end_time=now.isoformat(), outcome=outcome
            )
            logger.error(
                "%s tick %s: job %s %s", rec.schedule, rec.tick, rec.submission_id, outcome
            )

    def _settle_failed(self, now: dt.datetime, current: dict[str, str]) -> None:
        """Decide the failed submits that will not be retried (their grace is over, or a newer
        tick superseded them): a job that exists after all is recorded as submitted, else the
        tick is given up. A cluster that cannot be asked leaves the row for the next pass."""
        for rec in self.store.records(["submit_failed"]):
            if _gave_up(rec):
                continue
            tick = dt.datetime.fromisoformat(rec.tick)
            if current.get(rec.schedule) == rec.tick and now - tick <= self.grace:
                continue  # still being retried by _tick
            try:
                info = self.client.get_job_info(rec.submission_id)
            except Exception as err:  # noqa: BLE001 - asked again on the next pass
                if not _job_missing(err):
                    logger.warning(
                        "%s tick %s: cannot tell whether %s exists after its failed submit "
                        "(asked again next pass): %s",
                        rec.schedule,
                        rec.tick,
                        rec.submission_id,
                        _describe(err),
                    )
                    continue
            else:
                self._found(rec, info, "its submit failed")
                continue
            why = (
                f"grace of {self.grace.total_seconds():g} s over"
                if current.get(rec.schedule) == rec.tick
                else "superseded by a newer tick"
            )
            outcome = f"{GAVE_UP} after {rec.attempts} attempt(s), {why}; last {rec.outcome}"
            self.store.update(rec.schedule, rec.tick, outcome=outcome)
            self._retry_at.pop((rec.schedule, rec.tick), None)
            logger.error("%s tick %s: submit %s", rec.schedule, rec.tick, outcome)

    def _found(self, rec: TickRecord, info: Any, why: str) -> None:
        """A job the store has as not submitted exists on the cluster: record it as submitted."""
        state = self._apply(
            rec, info, submitted_at=self.clock.now().isoformat(), outcome=f"submitted ({why})"
        )
        self._retry_at.pop((rec.schedule, rec.tick), None)
        logger.warning(
            "%s tick %s: %s, but job %s exists on the cluster (%s): recorded as submitted",
            rec.schedule,
            rec.tick,
            why,
            rec.submission_id,
            state,
        )

    def _blocker(self, schedule: str, key: str) -> str | None:
        """Why the schedule's tick `key` must not be submitted now, or None."""
        active = [r for r in self.store.records(ACTIVE) if r.schedule == schedule]
        if active:
            prev = active[-1]
            return f"previous run {prev.submission_id} still {prev.state}"
        unsettled = [
            r
            for r in self.store.records(["submit_failed"])
            if r.schedule == schedule and r.tick != key and not _gave_up(r)
        ]
        if unsettled:
            return (
                f"previous run {unsettled[-1].submission_id} may be running: its submit failed "
                "and the cluster could not yet be asked whether it exists"
            )
        return None

    def _tick(self, schedule: Schedule, now: dt.datetime) -> None:
        tick = due_tick(schedule.cron, now)
        key = tick.isoformat()
        run_name = tick_run_name(schedule.name, tick)
        rec = self.store.get(schedule.name, key)
        if rec is None:
            if now - tick > self.grace:
                self._dropped(schedule, key, tick, now)
                return
            blocker = self._blocker(schedule.name, key)
            if blocker:
                outcome = f"skipped: {blocker}"
                self.store.insert(schedule.name, key, "skipped", outcome=outcome)
                total = self.store.skip_counts().get(schedule.name, 0)
                logger.warning(
                    "%s tick %s: %s (%d skips so far)", schedule.name, key, outcome, total
                )
                return
            self.store.insert(schedule.name, key, "submitting", submission_id=run_name)
            self._submit(schedule, key, run_name, attempt=1)
        elif rec.state == "submitting":  # a crash between "submitting" and the job's record
            try:
                state = self.refresh(rec)
            except Exception as err:  # noqa: BLE001 - asked again on the next pass
                if not _job_missing(err):
                    logger.warning(
                        "%s tick %s: cannot tell whether %s was submitted before a restart "
                        "(asked again next pass): %s",
                        schedule.name,
                        key,
                        run_name,
                        _describe(err),
                    )
                    return
                logger.info(
                    "%s tick %s: %s was never submitted; submitting", schedule.name, key, run_name
                )
                self._submit(schedule, key, run_name, attempt=rec.attempts + 1)
                return
            logger.info(
                "%s tick %s: found job %s submitted before a restart (%s); not submitting again",
                schedule.name,
                key,
                run_name,
                state,
            )
        elif rec.state == "submit_failed" and not _gave_up(rec) and now - tick <= self.grace:
            retry_at = self._retry_at.get((schedule.name, key))
            if retry_at is None or now >= retry_at:  # none known: a restart; retry now
                logger.info(
                    "%s tick %s: retrying the submit of %s (attempt %d)",
                    schedule.name,
                    key,
                    run_name,
                    rec.attempts + 1,
                )
                self._submit(schedule, key, run_name, attempt=rec.attempts + 1)
        # else: decided before (possibly by an earlier scheduler process)

    def _dropped(self, schedule: Schedule, key: str, tick: dt.datetime, now: dt.datetime) -> None:
        """The due tick is older than the grace and has no record. Dropped by this scheduler
        (its pass came late): recorded `missed`, with a warning. Due before this scheduler
        started (it was down): not back-filled, logged once."""
        late = (now - tick).total_seconds()
        grace = self.grace.total_seconds()
        if tick >= self.started:
            outcome = (
                f"missed: the pass at {now.isoformat()} came {late:.0f} s after the tick, "
                f"beyond the grace of {grace:g} s (a slow pass or dashboard?)"
            )
            self.store.insert(schedule.name, key, "missed", submission_id=None, outcome=outcome)
            logger.warning("%s tick %s: %s", schedule.name, key, outcome)
        elif (schedule.name, key) not in self._noted_old:
            self._noted_old.add((schedule.name, key))
            logger.info(
                "%s tick %s: due %.0f s ago, before this scheduler started, beyond the grace of %g s "
                "(the scheduler was not running then); not back-filled",
                schedule.name,
                key,
                late,
                grace,
            )

    def _submit(self, schedule: Schedule, key: str, run_name: str, attempt: int) -> None:
        """Submit the tick's job (attempt number `attempt`) and record the result."""
        try:
            submit(self.client, schedule.entrypoint_for(run_name), run_name, schedule=schedule.name)
        except Exception as err:  # noqa: BLE001 - recorded, and the loop goes on
            self._submit_failed(schedule.name, key, run_name, attempt, err)
            return
        self._retry_at.pop((schedule.name, key), None)
        self.store.update(
            schedule.name,
            key,
            state="PENDING",
            submitted_at=self.clock.now().isoformat(),
            attempts=attempt,
            outcome="" if attempt == 1 else f"submitted on attempt {attempt}",
        )
        logger.info(
            "%s tick %s: submitted %s%s",
            schedule.name,
            key,
            run_name,
            "" if attempt == 1 else f" (attempt {attempt})",
        )

    def _submit_failed(
        self, schedule: str, key: str, run_name: str, attempt: int, err: BaseException
    ) -> None:
        """A submit raised. The job may exist all the same (the answer was lost, or timed out
        after Ray created it): the cluster is asked by the deterministic submission id, and a
        job that exists is recorded as submitted. Otherwise `submit_failed`, retried with
        backoff while the tick is within the grace."""
        what = _describe(err)
        logger.error(
            "%s tick %s: submit of %s (attempt %d): %s", schedule, key, run_name, attempt, what
        )
        unknown = ""
        try:
            info = self.client.get_job_info(run_name)
        except Exception as lookup_err:  # noqa: BLE001 - decided below
            if not _job_missing(lookup_err):
                unknown = (
                    f"; whether the job exists is unknown (looking it up: {_describe(lookup_err)})"
                )
        else:
            rec = self.store.get(schedule, key)
            assert rec is not None
            self.store.update(schedule, key, attempts=attempt)
            self._found(rec, info, f"its submit reported {what}")
            return
        now = self.clock.now()
        retry_at = now + dt.timedelta(seconds=retry_delay(attempt))
        ends = dt.datetime.fromisoformat(key) + self.grace
        if retry_at <= ends:
            self._retry_at[(schedule, key)] = retry_at
            plan = f"retrying at {retry_at:%H:%M:%S} (grace ends {ends:%H:%M:%S})"
        else:
            self._retry_at.pop((schedule, key), None)
            plan = f"no time left to retry within the grace (ends {ends:%H:%M:%S})"
        outcome = f"attempt {attempt}: {what}{unknown}; {plan}"
        self.store.update(schedule, key, state="submit_failed", attempts=attempt, outcome=outcome)
        logger.warning("%s tick %s: %s", schedule, key, outcome)

    def run(self, poll_s: float = 10.0) -> None:
        now = self.clock.now()
        for s in self.schedules:
            logger.info(
                "schedule %s: cron %r, next due tick %s (ticks older than %s are not back-filled)",
                s.name,
                s.cron,
                due_tick(s.cron, now).isoformat(),
                self.grace,
            )
            if s.max_run_hours is None:
                logger.warning(
                    "schedule %s: max_run_hours is null: a run that never ends blocks this "
                    "schedule for good",
                    s.name,
                )
        while True:
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - e.g. the dashboard restarting: retry
                logger.error("scheduler pass failed, retrying in %.0fs: %s", poll_s, err)
            self.clock.sleep(poll_s)


def _hours(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"


def run_schedules(
    schedule_file: Path,
    state_dir: Path,
    address: str | None = None,
    poll_s: float = 10.0,
    grace_s: float = 120.0,
    clock_file: Path | None = None,
    allow_insecure_token: bool = False,
    ray_timeout_s: float = DEFAULT_RAY_TIMEOUT_S,
) -> None:
    """`polytask schedule run`: validate, connect, lock the state directory, then loop until
    interrupted.

    `allow_insecure_token`: see `pipeline.jobs.submit.connect`. `ray_timeout_s`: the deadline
    of every call to the Ray dashboard.

    Raises:
        ScheduleError: bad intervals, a bad schedule file, or another scheduler holding
            `state_dir`.
        SubmitError: the dashboard refused, is unreachable or did not answer.
    """
    from pipeline.jobs.submit import connect

    check_timing(poll_s, grace_s, ray_timeout_s)
    schedules = load_schedules(schedule_file)
    client = connect(address, allow_insecure_token, timeout_s=ray_timeout_s)
    with scheduler_lock(state_dir) as lock:
        store = StateStore(state_dir)
        clock: Clock = FileClock(clock_file) if clock_file else SystemClock()
        logger.info(
            "scheduler: %d schedule(s), state in %s (locked: %s)", len(schedules), store.path, lock
        )
        try:
            Scheduler(schedules, client, store, clock, grace_s=grace_s).run(poll_s)
        finally:
            store.close()


def format_status(store: StateStore) -> str:
    """The history table (one line per tick) and the skip count of each schedule."""
    header = f"{'schedule':<16} {'tick (UTC)':<25} {'state':<13} {'duration':>9}  outcome"
    lines = [header, "-" * len(header)]
    for r in store.records():
        duration = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        lines.append(
            f"{r.schedule:<16} {r.tick:<25} {r.state:<13} {duration:>9}  "
            f"{r.submission_id or ''} {r.outcome}".rstrip()
        )
    if len(lines) == 2:
        lines.append("(no ticks recorded yet)")
    skips = store.skip_counts()
    names = sorted({r.schedule for r in store.records()})
    lines.append("")
    lines.append("skips: " + (", ".join(f"{n}={skips.get(n, 0)}" for n in names) or "none"))
    return "\n".join(lines)


def status_report(state_dir: Path) -> str:
    """`polytask schedule status`: the history table, without creating a state directory."""
    if not (Path(state_dir) / STATE_FILE).is_file():
        return f"no scheduler state in {state_dir} (`polytask schedule run` writes it)"
    store = StateStore(state_dir)
    try:
        return format_status(store)
    finally:
        store.close()
