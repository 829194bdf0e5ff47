"""The embedded scheduler: submit retraining as Ray Jobs on cron expressions.

    polytask schedule run configs/schedules/senteval6.yaml --address http://HEAD:8265
    polytask schedule status

Each step (every `poll_s` seconds):
  1. refresh the runs still PENDING/RUNNING (`get_job_info`): state, start, end, outcome;
  2. for each schedule, take its most recent due tick (the latest cron time <= now):
     - already in the state store -> nothing (a restarted scheduler never submits it again);
       a row left in `submitting` by a crash is reconciled with `get_job_info` on the
       deterministic submission id: found -> record it, not found -> submit it now;
     - the schedule's previous run still PENDING/RUNNING -> record a `skipped` tick (counted);
     - else record `submitting`, submit, record the job's state.

The tick time is the idempotency key: the store's primary key is (schedule, tick) and the
submission id is derived from it (`tick_run_name`), so even a duplicate submit would be
refused by the Ray job server.

Missed ticks are not back-filled: only the most recent due tick is considered, and only while
it is at most `grace_s` old (default 120 s). A scheduler down across several ticks fires the
latest one on restart if it is within the grace, and none of the older ones.

State: one SQLite file, `STATE_DIR/schedule.sqlite3`; every change is one transaction
(atomic, survives a kill at any point).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.jobs.submit import JobClient, retrain_entrypoint, submit, tick_run_name

logger = logging.getLogger(__name__)

STATE_FILE = "schedule.sqlite3"
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
                PRIMARY KEY (schedule, tick))"""
        )

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


def _job_missing(err: Exception) -> bool:
    return "404" in str(err) or "does not exist" in str(err).lower()


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
        self.schedules = schedules
        self.client = client
        self.store = store
        self.clock = clock
        self.grace = dt.timedelta(seconds=grace_s)

    def refresh(self, rec: TickRecord) -> str:
        """Copy the job's state from the cluster into the store; returns the state."""
        info = self.client.get_job_info(rec.submission_id)
        state = str(getattr(info.status, "value", info.status))
        start, end = info.start_time, info.end_time
        fields: dict[str, object] = {
            "state": state,
            "start_time": _ms_to_iso(start),
            "end_time": _ms_to_iso(end),
        }
        if start is not None and end is not None:
            fields["duration_s"] = round((end - start) / 1000, 3)
        if state in TERMINAL:
            fields["outcome"] = state.lower() + (f": {info.message}" if info.message else "")
        if state != rec.state:
            logger.info("%s tick %s: job %s %s", rec.schedule, rec.tick, rec.submission_id, state)
        self.store.update(rec.schedule, rec.tick, **fields)
        return state

    def step(self) -> None:
        now = self.clock.now()
        for rec in self.store.records(ACTIVE):
            try:
                self.refresh(rec)
            except RuntimeError as err:  # the cluster forgot the job (restarted): say so
                logger.warning(
                    "%s: cannot refresh job %s: %s", rec.schedule, rec.submission_id, err
                )
                if _job_missing(err):
                    self.store.update(rec.schedule, rec.tick, state="LOST", outcome=str(err))
        current = {s.name: due_tick(s.cron, now).isoformat() for s in self.schedules}
        for rec in self.store.records(["submitting"]):
            if current.get(rec.schedule) != rec.tick:  # an older tick left by a crash
                try:
                    self.refresh(rec)
                except RuntimeError as err:
                    if not _job_missing(err):
                        raise
                    logger.info(
                        "%s tick %s: never submitted; too old, not back-filled",
                        rec.schedule,
                        rec.tick,
                    )
                    self.store.update(
                        rec.schedule,
                        rec.tick,
                        state="missed",
                        outcome="not submitted before a restart",
                    )
        for schedule in self.schedules:
            self._tick(schedule, now)

    def _tick(self, schedule: Schedule, now: dt.datetime) -> None:
        tick = due_tick(schedule.cron, now)
        key = tick.isoformat()
        run_name = tick_run_name(schedule.name, tick)
        rec = self.store.get(schedule.name, key)
        if rec is not None and rec.state != "submitting":
            return  # decided before (possibly by an earlier scheduler process)
        if rec is None and now - tick > self.grace:
            return  # missed while down; not back-filled (logged once at start by run())
        if rec is not None:  # a crash between "submitting" and the job's record
            try:
                state = self.refresh(rec)
                logger.info(
                    "%s tick %s: found job %s submitted before a restart (%s); not submitting "
                    "again",
                    schedule.name,
                    key,
                    run_name,
                    state,
                )
                return
            except RuntimeError as err:
                if not _job_missing(err):
                    raise
                logger.info(
                    "%s tick %s: %s was never submitted; submitting", schedule.name, key, run_name
                )
        else:
            active = [r for r in self.store.records(ACTIVE) if r.schedule == schedule.name]
            if active:
                prev = active[-1]
                outcome = f"skipped: previous run {prev.submission_id} still {prev.state}"
                self.store.insert(schedule.name, key, "skipped", outcome=outcome)
                total = self.store.skip_counts().get(schedule.name, 0)
                logger.warning(
                    "%s tick %s: %s (%d skips so far)", schedule.name, key, outcome, total
                )
                return
            self.store.insert(schedule.name, key, "submitting", submission_id=run_name)
        try:
            submit(self.client, schedule.entrypoint_for(run_name), run_name, schedule=schedule.name)
        except Exception as err:  # noqa: BLE001 - recorded, and the loop goes on
            logger.error("%s tick %s: submit failed: %s", schedule.name, key, err)
            self.store.update(schedule.name, key, state="submit_failed", outcome=str(err))
            return
        self.store.update(
            schedule.name, key, state="PENDING", submitted_at=self.clock.now().isoformat()
        )
        logger.info("%s tick %s: submitted %s", schedule.name, key, run_name)

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
        while True:
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - e.g. the dashboard restarting: retry
                logger.error("scheduler pass failed, retrying in %.0fs: %s", poll_s, err)
            self.clock.sleep(poll_s)


def run_schedules(
    schedule_file: Path,
    state_dir: Path,
    address: str | None = None,
    poll_s: float = 10.0,
    grace_s: float = 120.0,
    clock_file: Path | None = None,
    allow_insecure_token: bool = False,
) -> None:
    """`polytask schedule run`: validate, connect, then loop until interrupted.

    `allow_insecure_token`: see `pipeline.jobs.submit.connect`.
    """
    from pipeline.jobs.submit import connect

    schedules = load_schedules(schedule_file)
    client = connect(address, allow_insecure_token)
    store = StateStore(state_dir)
    clock: Clock = FileClock(clock_file) if clock_file else SystemClock()
    logger.info("scheduler: %d schedule(s), state in %s", len(schedules), store.path)
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
