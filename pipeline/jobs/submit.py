"""Submit one retraining run to a Ray cluster as a Ray Job (`JobSubmissionClient`).

    polytask submit CONFIG [--address URL] [--run-name NAME]
      -> entrypoint `<this interpreter's polytask> retrain /abs/CONFIG --run-name NAME`
      -> JobSubmissionClient.submit_job(submission_id=NAME)

The run name doubles as the Ray submission id: `<schedule or config name>-<UTC time>-<hex>`,
so a run directory, its Ray Job and the scheduler's record share one key (Train V2 resumes by
name, so every run needs a new one).

Why the absolute `polytask` path: a job's entrypoint runs in the cluster's shell, where plain
`python`/`polytask` is the system one, not this virtualenv. The config path is made absolute
for the same reason (the job runs in a Ray-owned working directory); the config's own paths
resolve against the config file. This assumes the cluster's nodes share this filesystem and
environment (the local cluster, or an image built from this repo); a remote cluster without
them would need a `runtime_env` instead.

Token auth (Ray >= 2.59 turns it on for local clusters): the dashboard answers 401 without a
bearer token. The token is read the way Ray's own client reads it: `RAY_AUTH_TOKEN`, else the
file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`, and sent as
`Authorization: Bearer <token>` (explicitly, so that it works whether or not this process has
`RAY_AUTH_MODE=token` set).

The token controls the whole cluster, so it is never sent unencrypted to another machine: an
http:// address (or a bare host:port, which Ray reads as http) whose host is not loopback
(127.0.0.0/8, ::1, localhost) is refused before any request, unless the user opts in with
`--allow-insecure-token` or POLYTASK_ALLOW_INSECURE_TOKEN=1. https:// is fine anywhere. The
address checked is the one Ray's client will really use: RAY_API_SERVER_ADDRESS, then
RAY_ADDRESS, override the address it is given. The token itself is never logged.

Deadlines: Ray's `JobSubmissionClient` sends its requests with no timeout, so a dashboard that
accepts the connection and never answers would block the caller for good. `connect` returns a
`BoundedJobClient`: every call (the version check in `connect`, submit, status, list, stop) runs
in a daemon worker thread joined with a deadline (`timeout_s`, default 30 s) and raises
`RayCallTimeout` past it; the requests themselves also get `timeout=timeout_s`, so an abandoned
call ends soon after. At most `max_pending` abandoned calls may still be running: past that,
calls fail at once instead of starting more threads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
INSECURE_TOKEN_ENV = "POLYTASK_ALLOW_INSECURE_TOKEN"
# Ray's JobSubmissionClient replaces the address it is given with these, in this order.
ADDRESS_OVERRIDE_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_RAY_TIMEOUT_S = 30.0  # the deadline of every call to the Ray dashboard
MAX_PENDING_CALLS = 4  # abandoned (timed-out) calls still running before calls fail at once
# Ray's SubmissionClient._raise_error: "Request failed with status code 404: <body>."
_STATUS_RE = re.compile(r"Request failed with status code (\d{3})\b")


class SubmitError(RuntimeError):
    """The cluster refused or could not be reached; the message says what to do."""


class RayCallTimeout(SubmitError):
    """A call to the Ray dashboard got no answer within its deadline (it may still have taken
    effect on the cluster: a timed-out submit can have created the job)."""

    def __init__(self, what: str, timeout_s: float, detail: str = ""):
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(
            f"timed out: no answer from the Ray dashboard to {what} within {timeout_s:g} s"
            + (f" ({detail})" if detail else "")
        )


class JobClient(Protocol):
    """The few `ray.job_submission.JobSubmissionClient` methods polytask uses (the fast tests
    implement them with a fake)."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str: ...

    def get_job_info(self, job_id: str) -> Any:  # JobDetails: status, start_time, end_time...
        ...

    def stop_job(self, job_id: str) -> bool: ...


def http_status(err: BaseException) -> int | None:
    """The HTTP status of a failed dashboard request, or None when `err` is not one (a refused
    connection, a timeout). Ray raises a plain RuntimeError whose message *starts* with
    "Request failed with status code N"; a `status_code` attribute (ours, or a response's)
    is read first. Never a substring of the message: run names hold digits like "404"."""
    for obj in (err, getattr(err, "response", None)):
        code = getattr(obj, "status_code", None)
        if isinstance(code, int):
            return code
    match = _STATUS_RE.match(str(err)) if isinstance(err, RuntimeError) else None
    return int(match.group(1)) if match else None


def job_missing(err: BaseException) -> bool:
    """Whether `err` is the dashboard's 404: no job with that id."""
    return http_status(err) == 404


def call_with_deadline(
    fn: Callable[[], Any], timeout_s: float, what: str, on_done: Callable[[], None] | None = None
) -> Any:
    """`fn()` in a daemon thread, waited for at most `timeout_s` seconds: its result, or its
    exception re-raised here; `RayCallTimeout` past the deadline (the thread is abandoned; a
    daemon thread never holds up the process's exit). `on_done` runs in the thread when `fn`
    returns, whether or not anyone still waits."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            result["error"] = err
        finally:
            done.set()
            if on_done is not None:
                on_done()

    threading.Thread(target=target, name=f"ray-call: {what}", daemon=True).start()
    if not done.wait(timeout_s):
        raise RayCallTimeout(what, timeout_s)
    if "error" in result:
        err = result["error"]
        if _is_requests_timeout(err):
            raise RayCallTimeout(what, timeout_s, str(err)) from err
        raise err
    return result["value"]


def _is_requests_timeout(err: BaseException) -> bool:
    try:
        from requests.exceptions import Timeout
    except ImportError:  # pragma: no cover - Ray's job client needs requests
        return False
    return isinstance(err, Timeout)


class BoundedJobClient:
    """A job client whose every call has a deadline (see the module docstring).

    Args:
        client: The client to call (Ray's `JobSubmissionClient`, or a fake).
        timeout_s: Seconds per call.
        max_pending: Calls still running (abandoned after their deadline, plus the current
            one) beyond which a new call fails at once with `RayCallTimeout`, so that a
            dashboard that never answers cannot pile up threads.
    """

    def __init__(
        self,
        client: Any,
        timeout_s: float = DEFAULT_RAY_TIMEOUT_S,
        max_pending: int = MAX_PENDING_CALLS,
    ):
        self.client = client
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def _address(self) -> str:
        return getattr(self.client, "_address", "?")

    @property
    def pending(self) -> int:
        """Calls started and not yet returned (abandoned ones included)."""
        with self._lock:
            return self._pending

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._pending >= self.max_pending:
                raise RayCallTimeout(
                    what,
                    self.timeout_s,
                    f"not sent: {self._pending} earlier calls are still waiting for an answer",
                )
            self._pending += 1

        def finished() -> None:
            with self._lock:
                self._pending -= 1

        return call_with_deadline(fn, self.timeout_s, what, on_done=finished)

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str:
        return self._call(
            f"submit_job({submission_id})",
            lambda: self.client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, **kwargs
            ),
        )

    def get_job_info(self, job_id: str) -> Any:
        return self._call(f"get_job_info({job_id})", lambda: self.client.get_job_info(job_id))

    def list_jobs(self) -> Any:
        return self._call("list_jobs()", self.client.list_jobs)

    def stop_job(self, job_id: str) -> bool:
        return self._call(f"stop_job({job_id})", lambda: self.client.stop_job(job_id))


def utc_stamp(when: dt.datetime) -> str:
    """`20261122T093000Z`: sortable, and legal in Ray submission ids and run directories."""
    return when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def new_run_name(prefix: str, now: dt.datetime | None = None) -> str:
    """A fresh unique name `<prefix>-<UTC time>-<6 hex>` for an ad-hoc run."""
    return f"{prefix}-{utc_stamp(now or dt.datetime.now(dt.UTC))}-{secrets.token_hex(3)}"


def tick_run_name(schedule: str, tick: dt.datetime) -> str:
    """The run name of one scheduled tick: deterministic, so that a scheduler restarted after
    a crash between submit and record finds the job it submitted (the same name) instead of
    submitting another. The hex part is derived from schedule and tick, not random."""
    digest = hashlib.sha256(f"{schedule}|{tick.isoformat()}".encode()).hexdigest()[:6]
    return f"{schedule}-{utc_stamp(tick)}-{digest}"


def read_auth_token() -> str | None:
    """The cluster token as Ray's client finds it; None when there is none."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def _auth_hint(address: str) -> str:
    return (
        f"Ray cluster at {address} refused the request (token authentication). Set "
        f"{TOKEN_ENV} to the cluster's token, or copy it to ~/.ray/auth_token "
        f"(`ray get-auth-token` on the head node prints it)."
    )


def effective_address(address: str | None) -> tuple[str, str]:
    """The dashboard address a JobSubmissionClient given `address` really contacts, and where it
    comes from: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, override `address` inside Ray's client;
    without any of them, the local dashboard."""
    for env in ADDRESS_OVERRIDE_ENVS:
        if value := os.environ.get(env):
            return value, env
    return (address, "--address") if address else (DEFAULT_ADDRESS, "the default")


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) or `localhost`; never resolved through DNS."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def check_token_transport(address: str, source: str, allow_insecure: bool = False) -> None:
    """Refuse to send the cluster token unencrypted to another machine.

    `address` is the dashboard address Ray will contact (`source` says where it came from, for
    the message). https:// passes, and so do a loopback host under any scheme and `auto` (the
    cluster running on this machine); anything else (http://, a bare host:port, ray://) passes
    only with `allow_insecure`, with a warning.

    Raises:
        SubmitError: the token would cross the network in plain text; says how to fix it.
    """
    if address.strip().lower() == "auto":
        return
    url = address if "://" in address else f"http://{address}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        host = parts.hostname
    except ValueError:
        host = None
    if scheme == "https" or is_loopback_host(host):
        return
    where = f"{host or address} ({address}, from {source})"
    if allow_insecure:
        logger.warning(
            "sending the Ray auth token unencrypted (%s://) to %s: allowed by "
            "--allow-insecure-token / %s",
            scheme,
            where,
            INSECURE_TOKEN_ENV,
        )
        return
    raise SubmitError(
        f"refusing to send the Ray auth token unencrypted ({scheme}://) to {where}: anyone on "
        "the network path could read it and run code on the cluster. Use an https:// dashboard address, "
        "or a tunnel to a loopback address (`ssh -L 8265:127.0.0.1:8265 HEAD`, then --address "
        "http://127.0.0.1:8265); to send it anyway, pass --allow-insecure-token or set "
        f"{INSECURE_TOKEN_ENV}=1."
    )


def _with_request_timeout(base: type, timeout_s: float) -> type:
    """`base` (Ray's JobSubmissionClient) with `timeout=timeout_s` on every request it sends:
    its `_do_request` forwards extra keywords to `requests.request`. The deadline thread bounds
    the call anyway; this makes an abandoned request end too."""

    class TimedSubmissionClient(base):  # type: ignore[misc,valid-type]
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedSubmissionClient


def connect(
    address: str | None = None,
    allow_insecure_token: bool = False,
    timeout_s: float = DEFAULT_RAY_TIMEOUT_S,
) -> BoundedJobClient:
    """A `JobSubmissionClient` for `address` (else RAY_ADDRESS, else the local dashboard),
    with the bearer token attached, every call bounded by `timeout_s` (`BoundedJobClient`).

    Args:
        allow_insecure_token: Send the token over plain HTTP to a non-loopback host (also
            POLYTASK_ALLOW_INSECURE_TOKEN=1); refused otherwise.
        timeout_s: Deadline of each call, the connection check included.

    Raises:
        SubmitError: on 401/403, an unreachable address, a dashboard that does not answer
            within `timeout_s`, or a token that would be sent unencrypted to another machine
            (checked before any request).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = read_auth_token()
    if token:
        target, source = effective_address(address)
        if address and source != "--address" and target != address:
            logger.warning(
                "%s=%s overrides --address %s in Ray's job client", source, target, address
            )
        allow = allow_insecure_token or _env_flag(INSECURE_TOKEN_ENV)
        check_token_transport(target, source, allow)
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client_class = _with_request_timeout(JobSubmissionClient, timeout_s)
    try:
        client = call_with_deadline(
            lambda: client_class(address, headers=headers),
            timeout_s,
            f"the version check at {address}",
        )
    except RayCallTimeout as err:
        raise SubmitError(
            f"the Ray dashboard at {address} did not answer within {timeout_s:g} s: is it "
            f"overloaded or hung? ({err})"
        ) from err
    except AuthenticationError as err:
        raise SubmitError(_auth_hint(address)) from err
    except ConnectionError as err:
        raise SubmitError(
            f"no Ray dashboard at {address}: start a cluster (`ray start --head`) or pass "
            f"--address ({err})"
        ) from err
    return BoundedJobClient(client, timeout_s)


def polytask_command() -> list[str]:
    """This environment's `polytask` as an absolute command (never the cluster's PATH)."""
    exe = Path(sys.executable).parent / "polytask"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "pipeline.cli"]


def retrain_entrypoint(
    config: Path, run_name: str, data_dir: Path | None = None, add_tasks: bool = False
) -> str:
    """The shell command a Ray Job runs: `polytask retrain /abs/CONFIG --run-name NAME`
    (with `--add-tasks` for an incremental schedule)."""
    args = [*polytask_command(), "retrain", str(Path(config).resolve()), "--run-name", run_name]
    if data_dir is not None:
        args += ["--data-dir", str(Path(data_dir).resolve())]
    if add_tasks:
        args.append("--add-tasks")
    return shlex.join(args)


def submit(client: JobClient, entrypoint: str, run_name: str, **metadata: str) -> str:
    """Submit `entrypoint` as a Ray Job whose submission id is `run_name`."""
    from ray.exceptions import AuthenticationError

    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=run_name,
            metadata={"polytask_run_name": run_name, **metadata},
        )
    except AuthenticationError as err:
        raise SubmitError(_auth_hint(getattr(client, "_address", "?"))) from err
    logger.info("submitted Ray Job %s: %s", job_id, entrypoint)
    return job_id


def submit_retrain(
    config: Path,
    address: str | None = None,
    run_name: str | None = None,
    data_dir: Path | None = None,
    allow_insecure_token: bool = False,
) -> str:
    """`polytask submit`: one retraining run now. Returns the submission id (= run name)."""
    config = Path(config)
    if not config.is_file():
        raise SubmitError(f"{config}: file not found")
    run_name = run_name or new_run_name(config.stem)
    client = connect(address, allow_insecure_token)
    return submit(client, retrain_entrypoint(config, run_name, data_dir), run_name)
