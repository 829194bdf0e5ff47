"""What `polytask serve` and `polytask predict` do, as plain functions the CLI and tests call."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from pathlib import Path

from serving.model_store import MODEL_ENV, ResolvedModel, fallback_candidates, resolve_model
from serving.runtime import ModelCheckError, Prediction, Runtime, load_checked
from serving.settings import API_KEYS_ENV, ServingSettings

logger = logging.getLogger(__name__)

SERVICE = "serving.service:Polytask"
REPO_ROOT = Path(__file__).resolve().parents[1]
# `serve --workers` above this many times the usable CPUs is refused: each model worker is a
# whole process with its own copy of the model and at least one ORT thread, so beyond the CPU
# count they only contend (24 workers on 2 cores took 3.5 GB for a tiny model and answered no
# faster), and far beyond it is a typo that would start thousands of processes. Between the CPU
# count and this cap a warning is logged: the CPU count seen in a container can be below what
# the workers really get, so a moderate oversubscription is left to the operator.
MAX_WORKERS_PER_CPU = 4


class ServeError(ValueError):
    """`serve` cannot start: a bad port, host or worker count, or the port is taken."""


class InputError(ValueError):
    """`predict` texts that the HTTP service would refuse (the message names their indices)."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as the runtime counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_serve_options(
    host: str, port: int, workers: int | None = None, api_workers: int | None = None
) -> None:
    """What `serve` checks before BentoML starts: the port (1-65535), the worker counts (at
    least 1; model workers at most MAX_WORKERS_PER_CPU x the CPUs, a warning above the CPUs),
    the host (an IP address, as BentoML requires) and that host:port can be bound now (a bind
    that is closed again at once: the port can still be taken before BentoML binds it, so
    this is only for a clear message in the common case).

    Raises:
        ServeError: naming the option and the problem.
    """
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: a port is 1-65535")
    for flag, value in (("--workers", workers), ("--api-workers", api_workers)):
        if value is not None and value < 1:
            raise ServeError(f"{flag} {value}: at least 1")
    cpus = usable_cpus()
    if workers is not None and workers > MAX_WORKERS_PER_CPU * cpus:
        raise ServeError(
            f"--workers {workers}: at most {MAX_WORKERS_PER_CPU * cpus} "
            f"({MAX_WORKERS_PER_CPU} per CPU, {cpus} CPU(s) here); each worker is a process "
            "with its own copy of the model, and beyond the CPU count they only contend"
        )
    if workers is not None and workers > cpus:
        logger.warning(
            "--workers %d is more than the %d CPU(s) this process may use: each worker loads "
            "its own copy of the model, and the extra ones only contend for the CPUs",
            workers,
            cpus,
        )
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ServeError(
            f"--host {host!r}: not an IP address (BentoML binds IP addresses only): 127.0.0.1 "
            "for this machine only, 0.0.0.0 for every interface, ::1 or :: for IPv6"
        ) from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the server's own socket: a port in TIME_WAIT is free, a listening one is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            why = "the port is already in use (another server is listening there)"
        elif err.errno == errno.EADDRNOTAVAIL:
            why = "that address is not one of this machine's"
        elif err.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges)"
        else:
            why = err.strerror or str(err)
        raise ServeError(f"cannot listen on {host}:{port}: {why}") from None


def serve(
    model: str | None = None,
    port: int = 3000,
    host: str = "127.0.0.1",
    workers: int | None = None,
    api_workers: int | None = None,
) -> None:
    """Serve the model over HTTP until interrupted (BentoML, blocking).

    Args:
        model: A model tag to pin (else $POLYTASK_MODEL, else promoted, else latest).
        port: HTTP port.
        host: Interface to bind; loopback by default, so that nothing is exposed to the
            network unless asked for (`0.0.0.0` in the image and the Kubernetes manifests).
        workers: Encoder (model) worker processes; default $POLYTASK_WORKERS or 1.
        api_workers: HTTP front worker processes; default $POLYTASK_API_WORKERS or 1.

    Raises:
        ServeError: a bad port, host or worker count, or the port is taken (checked first).
        ModelNotFoundError: no model to serve (checked before any process starts).
    """
    for name in ("POLYTASK_WORKERS", "POLYTASK_API_WORKERS"):  # what the flags default to
        raw = os.environ.get(name, "").strip()
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise ServeError(f"{name}={raw!r}: at least 1 worker")
    check_serve_options(host, port, workers, api_workers)
    import bentoml

    if model:
        os.environ[MODEL_ENV] = model
    # Fail fast with the store's message rather than a worker that never becomes ready, and on
    # bad limits or an unreadable API key file rather than workers that crash at start.
    resolve_model()
    settings = ServingSettings.from_env()
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys.enabled:
        logger.warning(
            "serving on %s without API keys: anyone who can reach this port can use /predict "
            "and /tasks (set %s or %s_FILE)",
            host,
            API_KEYS_ENV,
            API_KEYS_ENV,
        )
    # Read by serving.service when the supervisor and its workers import it.
    if workers is not None:
        os.environ["POLYTASK_WORKERS"] = str(workers)
    if api_workers is not None:
        os.environ["POLYTASK_API_WORKERS"] = str(api_workers)
    bentoml.serve(SERVICE, host=host, port=port, working_dir=str(REPO_ROOT), blocking=True)


def predict_local(texts: list[str], model: str | None = None) -> Prediction:
    """Every task's answer for `texts` from the local model store, without a server: the model
    the service would serve, loaded and checked as it loads it (`load_checked`). When that
    model is broken and not pinned, the first of `fallback_candidates` that loads answers
    instead (the last good promoted version first), with a warning naming both.

    Raises:
        InputError: a text the service would refuse as empty or not Unicode (checked first).
        ModelNotFoundError: no model to serve in the store.
        ModelCheckError: the model is broken and (unless pinned) no other version loads.
    """
    check_texts(texts)
    return _load_servable(resolve_model(tag=model)).predict(texts, return_all=False)


def check_texts(texts: list[str]) -> None:
    """The service's per-text rules (serving.schemas: `empty_text`, `invalid_text`) for texts
    given on the command line, where invalid UTF-8 arrives as lone surrogates.

    Raises:
        InputError: naming the indices of the refused texts (0 = the first text given).
    """
    from serving.schemas import blank_texts, non_unicode_texts

    for indices, what in (
        (blank_texts(texts), "empty (nothing but whitespace or invisible characters)"),
        (non_unicode_texts(texts), "not valid Unicode (invalid UTF-8 in the argument?)"),
    ):
        if indices:
            shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
            noun = "text" if len(indices) == 1 else "texts"
            raise InputError(f"{noun} {shown}: {what}")


def _load_servable(wanted: ResolvedModel) -> Runtime:
    """`wanted`'s runtime or, when it is broken and not pinned, the first fallback's."""
    try:
        return load_checked(wanted.path, version=wanted.tag)
    except ModelCheckError as err:
        if wanted.source == "pinned":
            raise
        broken = err
    for candidate in fallback_candidates(wanted.name, exclude={wanted.tag}):
        try:
            runtime = load_checked(candidate.path, version=candidate.tag)
        except ModelCheckError as err:
            logger.warning("fallback %s is broken too: %s", candidate.tag, err)
            continue
        logger.warning(
            "the %s model is broken (%s); answering with %s instead, as the service would",
            wanted.source,
            broken,
            candidate.tag,
        )
        return runtime
    raise ModelCheckError(f"{broken}; no other version of {wanted.name} loads") from None


def format_prediction(texts: list[str], prediction: Prediction) -> str:
    """One block per text: every task's label and probability."""
    lines = [f"model: {prediction.model_version}"]
    for text, result in zip(texts, prediction.results, strict=True):
        shown = text if len(text) <= 70 else text[:67] + "..."
        lines.append(f"\n{shown!r}{'  (truncated)' if result.truncated else ''}")
        width = max(len(t) for t in result.tasks)
        label_width = max(len(a.label) for a in result.tasks.values())
        for task, answer in result.tasks.items():
            lines.append(
                f"  {task:<{width}}  {answer.label:<{label_width}}  {answer.probability:.3f}"
            )
    return "\n".join(lines)
