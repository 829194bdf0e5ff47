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
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import secrets
import shlex
import sys
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


class SubmitError(RuntimeError):
    """The cluster refused or could not be reached; the message says what to do."""


class JobClient(Protocol):
    """The few `ray.job_submission.JobSubmissionClient` methods polytask uses (the fast tests
    implement them with a fake)."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str: ...

    def get_job_info(self, job_id: str) -> Any:  # JobDetails: status, start_time, end_time...
        ...


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


def connect(address: str | None = None, allow_insecure_token: bool = False) -> JobClient:
    """A `JobSubmissionClient` for `address` (else RAY_ADDRESS, else the local dashboard),
    with the bearer token attached.

    Args:
        allow_insecure_token: Send the token over plain HTTP to a non-loopback host (also
            POLYTASK_ALLOW_INSECURE_TOKEN=1); refused otherwise.

    Raises:
        SubmitError: on 401/403, an unreachable address, or a token that would be sent
            unencrypted to another machine (checked before any request).
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
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise SubmitError(_auth_hint(address)) from err
    except ConnectionError as err:
        raise SubmitError(
            f"no Ray dashboard at {address}: start a cluster (`ray start --head`) or pass "
            f"--address ({err})"
        ) from err


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
