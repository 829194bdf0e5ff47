"""The BentoML service (bentoml==1.4.39): every task's answer from one encoder pass.

Two services: the HTTP front (validation, batching) and the model (one worker process each by
default), so that the front stays responsive while the model computes:

    client --HTTP--> Polytask (main)                        Encoder (dependency)
                     POST /predict: validate, 4xx   --->    infer(texts): one ORT pass per
                     GET  /tasks                            length bucket (serving.runtime);
                     /healthz /livez /readyz /metrics       hot swap of the model
                     Batcher: requests merged

Requests are merged in the main service by `Batcher`, greedily: a request that arrives while
the Encoder is idle is sent at once, alone; requests that arrive while it is busy are merged
into the next call (up to POLYTASK_MAX_BATCH_SIZE texts), sent as soon as a call returns. The
runtime then splits each call into length buckets, so merging never pads short texts to long
ones. BentoML's own adaptive batching (a batchable API) was replaced: its dispatcher delays a
batch by its running average of past queueing times, which after a burst stays high for
minutes; one-text requests at 10/s then waited tens to hundreds of ms for nothing.
`/predict` and `/tasks` are a small Starlette app mounted on the main service: it validates the
raw body itself, so every rejection (malformed JSON included) gets a 4xx with a message and is
counted by reason. Outermost, `serving.guard.FrontDoor` answers any other path or method
(404/405, before BentoML's request metrics label the path; `FrontDoorService`); in front of
every route, `serving.guard.ApiKeyGuard` checks API keys; the body is read under a byte limit
and a deadline before anything parses it (serving/guard.py). `/healthz`,
`/livez`, `/readyz` and `/metrics` are BentoML's; `/readyz` is 503 until the Encoder has loaded
a model (`__is_ready__`), and `/metrics` aggregates our prometheus_client metrics over all
workers of both services.

Environment (read when the service module is imported / a worker starts):
    POLYTASK_MODEL             pinned model tag (never swapped); else promoted, else latest
    POLYTASK_MODEL_NAME        model name for promoted/latest (default polytask-senteval6)
    POLYTASK_RELOAD_SECONDS    how often the Encoder looks for a newer model (default 30; 0 off)
    POLYTASK_WORKERS           Encoder workers (default 1)
    POLYTASK_API_WORKERS       main service workers (default 1)
    POLYTASK_MAX_BATCH_SIZE    texts per merged Encoder call (default 64)
    POLYTASK_MAX_LATENCY_MS    queueing bound before the batcher sheds load with 503 (5000)
    POLYTASK_MAX_TEXTS, POLYTASK_MAX_BODY_BYTES, POLYTASK_MAX_TEXT_CHARS, POLYTASK_API_KEYS(_FILE),
    POLYTASK_METRICS_API_KEYS(_FILE)
                               the trust boundary: limits and API keys (serving/settings.py)
    POLYTASK_BODY_TIMEOUT_S    seconds a request body may take to arrive (10; serving/guard.py)
    POLYTASK_HEADER_TIMEOUT_S, POLYTASK_MAX_CONNECTIONS
                               a request head's deadline (10 s) and open connections per HTTP
                               worker (1000), below the ASGI app (serving/connections.py)
    POLYTASK_ORT_THREADS       onnxruntime intra-op threads per Encoder worker
    POLYTASK_ORT_SPINNING      1: idle intra-op threads spin (default 0: they sleep)
    POLYTASK_ORT_PARALLEL      1: a call with enough work runs its length buckets on one
                               single-threaded session call per thread at once (default);
                               0: one bucket at a time on all threads (serving/runtime.py)
    POLYTASK_ORT_SPLIT         1: on that path, the encoder part of the graph per bucket and
                               the task heads once per request (default); 0: the whole
                               graph per bucket
    POLYTASK_ORT_DEVICE        auto | cpu | cuda

Run: `polytask serve` or `bentoml serve serving.service:Polytask`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import bentoml
from bentoml.exceptions import ServiceUnavailable
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.artifact import ArtifactMetadata
from serving.connections import install_connection_guard
from serving.guard import (
    BODY_TIMEOUT_ENV,
    ApiKeyGuard,
    FrontDoor,
    body_timeout_s,
    check_content_type,
    install_access_log_escaper,
    read_body,
)
from serving.metrics import get_metrics, use_private_multiproc_dir
from serving.model_store import (
    MODEL_ENV,
    LoadFailure,
    ResolvedModel,
    fallback_candidates,
    model_name,
    redact_paths,
    resolve_model,
    version_signature,
)
from serving.runtime import Runtime, load_checked, ort_threads
from serving.schemas import (
    MAX_REPORTED,
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    RequestError,
    TasksResponse,
    parse_predict_request,
    quote,
)
from serving.settings import (
    API_KEYS_ENV,
    MAX_BODY_BYTES_ENV,
    METRICS_API_KEYS_ENV,
    get_settings,
)

logger = logging.getLogger(__name__)

RELOAD_ENV = "POLYTASK_RELOAD_SECONDS"

# Before BentoML's supervisor starts the server: each server gets its own metrics files, never
# the shared store's, which every starting replica emptied (serving.metrics).
use_private_multiproc_dir()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{name}={raw!r}: expected a non-negative integer")
    return int(raw)


def _env_workers(name: str) -> int:
    """A worker count from the environment (default 1); 0 is refused, not read as 1."""
    value = _env_int(name, 1)
    if value < 1:
        raise ValueError(f"{name}={value}: at least 1 worker")
    return value


ENCODER_WORKERS = _env_workers("POLYTASK_WORKERS")
API_WORKERS = _env_workers("POLYTASK_API_WORKERS")
MAX_BATCH_SIZE = max(2, _env_int("POLYTASK_MAX_BATCH_SIZE", 64))
# How long a request may wait in the batcher's queue before it is refused with a 503 ("process
# is overloaded"); a bound against runaway queues, so it must not be tight.
MAX_LATENCY_MS = max(1, _env_int("POLYTASK_MAX_LATENCY_MS", 5000))
# Encoder calls one main-service worker keeps in flight, and how many the Encoder runs at once
# (BentoML's `threads`). Its runtime pools the texts of concurrent calls into shared length
# buckets (serving.runtime.BucketScheduler), so calls sent at once compute together, and while
# one call's last bucket runs the other core starts on the next call's. Requests beyond this
# are merged by the Batcher.
MAX_CALLS_IN_FLIGHT = 4


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, BentoML, the served model's Python side)
    out of the garbage collector's reach (`gc.freeze`), so a full collection during serving
    scans only what requests created. A worker holds ~90,000 objects after start-up; a full
    collection of them took 20-33 ms here, a pause that lands on whichever request is running
    (docs/results.md, issue 11, run 10).

    Called again after each model swap: what was frozen is handed back first (`gc.unfreeze`),
    so the swapped-out model, whose runtime and scheduler refer to each other, is collected
    rather than kept for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# --------------------------------------------------------------------------- the model
@bentoml.service(workers=ENCODER_WORKERS, threads=MAX_CALLS_IN_FLIGHT, traffic={"timeout": 60})
class Encoder:
    """Runs the model: one ORT call per merged batch (see `Batcher`), answers for every task."""

    RETRY_FAILED_S = 600.0

    def __init__(self) -> None:
        self._runtime: Runtime | None = None
        # For HTTP bodies, so without filesystem paths (the log has them): why no model is
        # loaded, and, while a fallback is served, which model failed and why.
        self._error: str | None = None
        self._fallback: str | None = None
        # Versions that failed to load or to answer known texts: the reason, and what their
        # directory held then. A failed version is tried again (and counted again) only when
        # its files change (it was seen half-copied) or RETRY_FAILED_S after the failure (a
        # transient cause, e.g. memory while two models were resident), so a steady fallback
        # loads nothing.
        self._failed: dict[str, LoadFailure] = {}
        self._pinned = bool(os.environ.get(MODEL_ENV, "").strip())
        self._interval = _env_int(RELOAD_ENV, 30)
        self._threads = (
            ort_threads()
            if os.environ.get("POLYTASK_ORT_THREADS")
            else max(1, ort_threads() // ENCODER_WORKERS)
        )
        self._stop = threading.Event()
        # One model call at a time per worker on the sequential path (POLYTASK_ORT_PARALLEL=0,
        # CUDA): two concurrent runs would each get all intra-op threads and fight over the
        # same cores. The data-parallel path's scheduler bounds its own threads instead.
        self._run_lock = threading.Lock()
        # Load in the background: /livez answers at once, /readyz once the model is loaded.
        threading.Thread(target=self._load_and_watch, name="polytask-model", daemon=True).start()

    def _load(self, resolved: ResolvedModel) -> Runtime | None:
        """The model, loaded and checked on known texts (`load_checked`, as promotion checks
        it); None when it is broken: logged with its path and counted, and not tried again
        until its files change or `RETRY_FAILED_S` passed (see `_failed`)."""
        failure = self._failed.get(resolved.tag)
        if failure is not None and not failure.retry_due(resolved.path, self.RETRY_FAILED_S):
            return None
        # Taken before the load: files that change during it are seen as a change next time.
        signature = version_signature(resolved.path)
        try:
            runtime = load_checked(resolved.path, version=resolved.tag, threads=self._threads)
        except Exception as err:
            reason = str(err).removeprefix(f"{resolved.tag}: ")  # the tag is said around it
            self._failed[resolved.tag] = LoadFailure(
                redact_paths(reason, {str(resolved.path): resolved.tag}),
                signature,
                time.monotonic(),
            )
            get_metrics().load_failures.inc()
            logger.error(
                "model %s (%s, %s) cannot be served: %s",
                resolved.tag,
                resolved.source,
                resolved.path,
                err,
            )
            return None
        self._failed.pop(resolved.tag, None)
        return runtime

    def _load_and_watch(self) -> None:
        while not self._stop.is_set() and not self._load_first():
            self._stop.wait(max(self._interval, 5))  # a model may be exported or promoted later
        if self._pinned or self._interval <= 0:
            return
        while not self._stop.wait(self._interval):
            self.check_for_new_model()

    def _load_first(self) -> bool:
        """Serve the model the store designates or, when it is broken (and not pinned), the
        first of `fallback_candidates` that loads: the last good promoted version, else the
        newest. Returns whether a model is served."""
        try:
            wanted = resolve_model()
            runtime, chosen = self._load(wanted), wanted
            if runtime is None:
                runtime, chosen = self._fallback_for(wanted, None)
        except Exception as err:  # no model yet, or the store cannot be read
            self._error = redact_paths(str(err))
            logger.error("no model loaded: %s", err)
            return False
        if runtime is None or chosen is None:
            others = (
                "" if wanted.source == "pinned" else f"; no other version of {wanted.name} loads"
            )
            self._error = f"{wanted.tag} is broken: {self._failed[wanted.tag].reason}{others}"
            logger.error("no model loaded: %s", self._error)
            return False
        self._serve(runtime, chosen, wanted)
        return True

    def _fallback_for(
        self, wanted: ResolvedModel, current: Runtime | None
    ) -> tuple[Runtime | None, ResolvedModel | None]:
        """What stands in for `wanted`, which did not load: the first of `fallback_candidates`
        (the last good promoted version first) that loads, as at start-up, so a running and a
        restarted replica serve the same model.

        Returns:
            (its runtime, it); (None, it) when it is the model served now (`current`, not
            loaded again); (None, None) when `wanted` is pinned or no other version loads.
        """
        if wanted.source == "pinned":
            return None, None
        for candidate in fallback_candidates(wanted.name, exclude={wanted.tag}):
            if current is not None and candidate.tag == current.version:
                return None, candidate
            runtime = self._load(candidate)
            if runtime is not None:
                return runtime, candidate
        return None, None

    def _serve(self, runtime: Runtime, chosen: ResolvedModel, wanted: ResolvedModel) -> None:
        """Swap in `runtime` (the model `chosen`, in place of `wanted` if they differ)."""
        old = self._runtime
        previous = old.version if old is not None else None
        self._runtime = runtime
        self._error = None
        metrics = get_metrics()
        metrics.set_active_version(runtime.version, previous)
        # Drift: the served model's dev label mix and confidence, its counters created at 0.
        metrics.set_dev_reference(
            runtime.metadata.tasks, old.metadata.tasks if old is not None else None
        )
        if previous is not None:
            metrics.swaps.inc()
        self._set_fallback(None if chosen.tag == wanted.tag else wanted)
        logger.info("serving %s (%s; before: %s)", chosen.tag, chosen.source, previous)
        del old
        freeze_startup_objects()  # the swapped-out model is collected first

    def _set_fallback(self, failed: ResolvedModel | None) -> None:
        """Record that the served model stands in for `failed` (None: it does not)."""
        note = None
        if failed is not None:
            note = (
                f"serving {self._runtime.version if self._runtime else None} because the "
                f"{failed.source} model {failed.tag} is broken: {self._failed[failed.tag].reason}"
            )
            if note != self._fallback:
                logger.warning("fallback: %s", note)
        elif self._fallback is not None:
            logger.info("no longer on a fallback model")
        self._fallback = note
        get_metrics().fallback.set(0 if note is None else 1)

    def check_for_new_model(self) -> bool:
        """Load the promoted/latest model if it changed, then swap the reference.

        Requests in flight keep the Runtime they started with; the swap is one assignment,
        so no request sees a half-loaded model and none fails. A model that does not load is
        not swapped in: as at start-up, the first of `fallback_candidates` that loads is
        served instead (counted, logged, in `describe`), swapped in only if it is not the
        current model; when none loads, the current one stays.
        """
        try:
            wanted = resolve_model(name=model_name())
        except Exception:
            logger.exception("model check failed; keeping the current model")
            return False
        current = self._runtime
        if current is not None and wanted.tag == current.version:
            if self._fallback is not None:  # e.g. rolled back to the model served
                self._set_fallback(None)
            return False
        new, chosen = self._load(wanted), wanted
        if new is None:
            new, chosen = self._fallback_for(wanted, current)
        if new is None or chosen is None:
            if current is not None:
                self._set_fallback(wanted)
            return False
        self._serve(new, chosen, wanted)
        return True

    @bentoml.on_shutdown
    def _stop_watching(self) -> None:
        self._stop.set()

    def __is_ready__(self) -> bool:
        return self._runtime is not None

    def _require(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:
            raise ServiceUnavailable(
                f"no model loaded yet{f': {self._error}' if self._error else ''}"
            )
        return runtime

    @bentoml.api
    def infer(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text: model version, truncated flag and every task's probabilities; or, for a
        text the model could not process, `{"version", "error"}` (see `_one_by_one`).

        `texts` are usually several requests' texts, merged by the caller's `Batcher`."""
        runtime = self._require()
        metrics = get_metrics()
        lock = self._run_lock if runtime.scheduler is None else contextlib.nullcontext()
        with lock:
            start = time.perf_counter()
            try:
                out = runtime.run(texts)
            except Exception as err:
                # The batch merges several clients' requests: one bad text must not fail the
                # rest.
                return _one_by_one(runtime, texts, err)
        metrics.latency.observe(time.perf_counter() - start)
        metrics.batch_size.observe(len(texts))
        return _rows(runtime, out)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Tasks, labels and version of the loaded model; `{"error": ...}` while none is.

        An answer rather than an exception: BentoML replaces a 5xx's message with a generic
        one, and the caller should see why no model is loaded."""
        runtime = self._runtime
        if runtime is None:
            return {"error": f"no model loaded yet: {self._error or 'loading'}"}
        # `fallback`: why another model than the store's promoted/latest one is served, or None.
        return with_routes({**runtime.describe(), "fallback": self._fallback}, runtime.metadata)


def with_routes(info: dict[str, Any], metadata: ArtifactMetadata) -> dict[str, Any]:
    """`info` (a /tasks answer) with each task's route from the artifact: the path that
    answers it and the dev evidence for the choice (pipeline/routing.py); absent without one."""
    for task in metadata.tasks:
        if task.route is not None and task.name in info["tasks"]:
            info["tasks"][task.name]["route"] = task.route.model_dump()
    return info


# Answered alone when a text's own batch failed, to tell a bad text from a broken model.
PROBE_TEXT = "ok"


def _rows(runtime: Runtime, out: Any) -> list[dict[str, Any]]:
    """One answer per text of a BatchOutput, with the labels of the model that gave it.

    Labels travel with the probabilities: during a swap, two model workers may serve two
    versions, and each answer must be decoded with the labels of the model that gave it."""
    probs = {t: p.tolist() for t, p in out.probabilities.items()}
    return [
        {
            "version": out.model_version,
            "truncated": bool(out.truncated[i]),
            "probabilities": {
                t: dict(zip(runtime.labels[t], p[i], strict=True)) for t, p in probs.items()
            },
        }
        for i in range(len(out.truncated))
    ]


def _one_by_one(runtime: Runtime, texts: list[str], error: Exception) -> list[dict[str, Any]]:
    """Answer each text of a failed batch on its own (defence in depth behind validation).

    A text that fails alone gets an error row, and only its request is refused (422); the
    others are answered. If every text fails and a known-good probe fails too, the model is
    broken, not the input: the original error propagates (503 for the batch).
    """
    rows: list[dict[str, Any]] = []
    failed = 0
    for text in texts:
        try:
            rows.extend(_rows(runtime, runtime.run([text])))
        except Exception:
            failed += 1
            rows.append({"version": runtime.version, "error": "unprocessable_text"})
    if failed == len(texts):
        try:
            runtime.run([PROBE_TEXT])
        except Exception:
            raise error from None
    # No traceback and no text: the input is the client's, the fault is not the service's.
    logger.warning(
        "a batch of %d texts failed (%s); answered one by one, %d text(s) refused",
        len(texts),
        type(error).__name__,
        failed,
    )
    get_metrics().batch_size.observe(len(texts))
    return rows


# --------------------------------------------------------------------------- HTTP endpoints
async def _predict(request: Request) -> JSONResponse:
    service: Polytask = bentoml.get_current_service()
    settings = get_settings()
    try:
        # Cheap checks first, the body last: nothing is read, parsed or queued for the model
        # before the request is known to be small enough and declared as JSON.
        try:
            check_content_type(request)
            body = await read_body(request, settings.max_body_bytes)
            req = parse_predict_request(
                body, limit=settings.max_texts, max_text_chars=settings.max_text_chars
            )
        except RequestError:
            raise
        except Exception as err:  # input validation did not foresee: still the client's input
            _log_validation_gap(err)
            raise RequestError(400, "invalid_request", "the request body cannot be read") from None
        return JSONResponse(await service.predict(req))
    except RequestError as err:
        # A client error: counted by reason, never logged with a traceback.
        get_metrics().rejected.labels(reason=err.reason).inc()
        # The rest of a refused body may still be on its way: close rather than read it.
        close = err.status in (408, 413) or err.reason == "client_disconnected"
        headers = {"connection": "close"} if close else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)
    except Exception:  # the Encoder failed or timed out: not the client's fault
        logger.exception("prediction failed")
        get_metrics().rejected.labels(reason="unavailable").inc()
        body = ErrorResponse(
            error="the model is unavailable or overloaded; retry later", reason="unavailable"
        )
        return JSONResponse(body.model_dump(), status_code=503)


_GAPS_LOGGED: set[str] = set()


def _log_validation_gap(err: Exception) -> None:
    """Log an unexpected validation error: with its traceback the first time per kind in a
    process (a gap to close), in one line after that (a client cannot flood the log)."""
    kind = type(err).__name__
    if kind in _GAPS_LOGGED:
        logger.warning("request refused: validation failed unexpectedly (%s)", kind)
        return
    _GAPS_LOGGED.add(kind)
    logger.error("request refused: validation failed unexpectedly", exc_info=err)


async def _tasks(_: Request) -> JSONResponse:
    service: Polytask = bentoml.get_current_service()
    try:
        info = await service.model_info(refresh=True)
    except RequestError as err:
        return JSONResponse(err.body(), status_code=err.status)
    return JSONResponse(TasksResponse.model_validate(info).model_dump())


async def _openapi(_: Request) -> JSONResponse:
    return JSONResponse(openapi_schema())


def openapi_schema() -> dict[str, Any]:
    """OpenAPI 3 description of /predict and /tasks, with examples."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema(
        [
            (m, "validation" if m is PredictRequest else "serialization")
            for m in (PredictRequest, PredictResponse, TasksResponse, ErrorResponse)
        ],
        ref_template="#/components/schemas/{model}",
    )

    def body(model: type, description: str) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"description": description, "content": {"application/json": {"schema": ref}}}

    limits = get_settings()
    errors = {
        "400": body(ErrorResponse, "Malformed JSON, invalid UTF-8, or nesting too deep."),
        "401": body(
            ErrorResponse,
            f"Missing or invalid API key (only when {API_KEYS_ENV} is set): send "
            "`Authorization: Bearer <key>`.",
        ),
        "413": body(
            ErrorResponse,
            f"Body larger than {limits.max_body_bytes:,} bytes ({MAX_BODY_BYTES_ENV}).",
        ),
        "408": body(
            ErrorResponse,
            f"The body did not arrive within {body_timeout_s()} s ({BODY_TIMEOUT_ENV}).",
        ),
        "415": body(
            ErrorResponse, "Content-Type is not application/json, or the body is compressed."
        ),
        "422": body(
            ErrorResponse,
            "Invalid request (the message names the field or the text's index): e.g. more than "
            f"{limits.max_texts} texts, a text over {limits.max_text_chars:,} characters, an "
            "empty or non-Unicode text, an unknown task.",
        ),
        "503": body(ErrorResponse, "No model loaded yet, or the model failed."),
    }
    security = [{"bearer": []}] if limits.api_keys.enabled else []
    return {
        "openapi": "3.0.2",
        "info": {"title": "polytask", "version": "1"},
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Every requested task's label and probability for each text.",
                    "requestBody": body(
                        PredictRequest,
                        f"Texts to classify: a JSON body of at most {limits.max_body_bytes:,} "
                        "bytes.",
                    ),
                    "responses": {"200": body(PredictResponse, "Answers."), **errors},
                    "security": security,
                }
            },
            "/tasks": {
                "get": {
                    "summary": "The model's tasks and their labels.",
                    "responses": {
                        "200": body(TasksResponse, "Tasks."),
                        "401": errors["401"],
                        "503": errors["503"],
                    },
                    "security": security,
                }
            },
        },
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": f"An API key from {API_KEYS_ENV}; /metrics takes one from "
                    f"{METRICS_API_KEYS_ENV} when that is set.",
                }
            },
        },
    }


app = Starlette(
    routes=[
        Route("/predict", _predict, methods=["POST"]),
        Route("/tasks", _tasks, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
    ]
)

# Every path the HTTP service answers, with its methods: ours above, and BentoML's probes and
# /metrics. Anything else (BentoML's UI at /, /docs.json, /schema.json and /static_content
# included) gets a JSON 404 from `FrontDoor`, before BentoML's request metrics label it.
ROUTES: dict[str, tuple[str, ...]] = {
    **{route.path: tuple(sorted(route.methods or ())) for route in app.routes},
    "/livez": ("GET",),
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/metrics": ("GET",),
}


class FrontDoorService(bentoml.Service):
    """A BentoML service whose whole ASGI app sits behind `serving.guard.FrontDoor`.

    bentoml 1.4.39 puts middlewares added with `add_asgi_middleware` inside its own request
    metrics and access log (`_bentoml_impl/server/app.py`, `ServiceAppFactory.middlewares`),
    which label every request with its raw path: unknown paths grew /metrics without limit
    (16 MB after 2,000 requests). Wrapping the app `to_asgi` returns is the one place in front
    of them."""

    def to_asgi(self, is_main: bool = True) -> Any:
        install_access_log_escaper()
        # BentoML's worker calls this before it builds its uvicorn server: the header timeout,
        # connection limit and JSON protocol errors are in place for that server.
        install_connection_guard()
        return FrontDoor(super().to_asgi(is_main=is_main), routes=ROUTES)


@bentoml.asgi_app(app)
@bentoml.service(workers=API_WORKERS, traffic={"timeout": 60}, service_class=FrontDoorService)
class Polytask:
    """Multi-task text classification: POST /predict, GET /tasks (see /openapi.json)."""

    encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        # The Encoder's describe(), for validating `tasks` before inference; refreshed when an
        # answer comes from another model version.
        self._info: dict[str, Any] | None = None
        self._batcher: Batcher | None = None
        body_timeout_s()  # a bad POLYTASK_BODY_TIMEOUT_S fails the start, not a request
        freeze_startup_objects()

    async def __is_ready__(self) -> bool:
        """Ready once the Encoder serves a model.

        BentoML 1.4.39's /readyz body is fixed (a newline, or a generic 503 text), but Starlette
        renders an HTTPException raised here with its own status and text: /readyz says why
        it is not ready, and (200) which model it serves instead of a broken one."""
        try:
            info = await self.model_info(refresh=True)
        except RequestError as err:
            raise HTTPException(503, f"not ready: {err}\n") from None
        if not await self.encoder.is_ready(5):  # its /readyz: model loaded
            return False
        if info.get("fallback"):
            raise HTTPException(200, f"ready, on a fallback model: {info['fallback']}\n")
        return True

    async def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """The Encoder's model description: version, tasks and labels.

        Raises:
            RequestError: 503 while no model is loaded.
        """
        info = self._info
        if info is not None and not refresh:
            return info
        try:
            info = await self.encoder.to_async.describe()
        except Exception as err:
            # The error may name a socket or file: HTTP bodies carry no paths.
            raise RequestError(
                503, "not_ready", f"model not available: {redact_paths(str(err))}"
            ) from None
        if "error" in info:
            raise RequestError(503, "not_ready", info["error"])
        self._info = info
        return info

    async def _infer(self, texts: list[str]) -> list[dict[str, Any]]:
        """The Encoder's rows for `texts`, merged with other requests' by the batcher."""
        if self._batcher is None:
            _keep_sessions_open(self.encoder)
            encoder = self.encoder
            self._batcher = Batcher(
                lambda merged: _infer_with_retry(encoder, merged),
                max_texts=MAX_BATCH_SIZE,
                max_wait_s=MAX_LATENCY_MS / 1000,
                max_calls=MAX_CALLS_IN_FLIGHT,
            )
        return await self._batcher.submit(texts)

    async def predict(self, req: PredictRequest) -> dict[str, Any]:
        """Validate tasks against the model, run the Encoder, pick each task's label."""
        info = await self.model_info()
        tasks = _check_tasks(req.tasks, list(info["tasks"]))
        rows = await self._infer(req.texts)
        bad = [i for i, row in enumerate(rows) if "error" in row]
        if bad:
            raise RequestError(
                422,
                "unprocessable_text",
                f"texts{bad[:10]}: the model could not process these texts",
            )
        # One request is one job in one batch, so all its rows come from one model.
        version = rows[0]["version"]
        if version != info["model_version"]:  # the Encoder swapped models since
            self._info = None
            tasks = _check_tasks(req.tasks, list(rows[0]["probabilities"]))
        metrics = get_metrics()
        results = []
        for row in rows:
            answers = {}
            for task in tasks:
                probs: dict[str, float] = row["probabilities"][task]
                label = max(probs, key=probs.__getitem__)
                answers[task] = {"label": label, "probability": probs[label]}
                if req.return_all_probabilities:
                    answers[task]["probabilities"] = probs
            results.append({"tasks": answers, "truncated": row["truncated"]})
        cut = sum(1 for r in results if r["truncated"])
        for task in tasks:
            metrics.record_answers(
                task,
                [r["tasks"][task]["label"] for r in results],
                [r["tasks"][task]["probability"] for r in results],
            )
            metrics.record_truncated(task, cut)
        return PredictResponse(results=results, model_version=version).model_dump(exclude_none=True)


# API keys for /predict, /tasks and /metrics, checked before any route runs (serving/guard.py).
Polytask.add_asgi_middleware(ApiKeyGuard)


def _keep_sessions_open(encoder: Any) -> None:
    """Stop BentoML's dependency client from recycling its session every 100 requests.

    bentoml 1.4.39 (`_bentoml_impl/client/proxy2.py`, SessionManager) closes its aiohttp
    session every 100 requests or 5 minutes while other requests are still in flight on it;
    those fail with "Server disconnected" (bentoml/BentoML#4971, fix proposed in #5698). Under
    32 concurrent requests that was ~2% of calls here. Only the request-count refresh is turned
    off; the 5-minute one stays, and `_infer_with_retry` covers it.
    """
    manager = getattr(encoder.to_async, "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests"):
        manager.max_requests = 2**62
    else:
        logger.warning("bentoml client internals changed; session recycling left as is")


async def _infer_with_retry(encoder: Any, texts: list[str]) -> list[dict[str, Any]]:
    """The Encoder's answer; one retry when the connection dropped under the request (see
    `_keep_sessions_open`; `infer` has no side effects beyond metrics, so a retry is safe)."""
    import aiohttp

    try:
        return await encoder.to_async.infer(texts=texts)
    except aiohttp.ClientConnectionError as err:
        logger.warning("Encoder connection dropped (%s); retrying once", err)
        return await encoder.to_async.infer(texts=texts)


class Batcher:
    """Merges concurrent requests into few model calls, without ever waiting for more.

    A request is sent at once when fewer than `max_calls` calls are in flight; otherwise it
    queues, and when a call returns, everything queued (up to `max_texts` texts; a request is
    never split) goes out as the next call. So a lone request pays no batching delay, and under
    load the calls grow as large as the model's pace makes them. Runs on one event loop (no
    locks). A request queued longer than `max_wait_s` is refused with ServiceUnavailable (503).

    Args:
        call: Answers a list of texts with one row per text, in order.
        max_texts: Most texts merged into one call (a larger request goes alone).
        max_wait_s: Longest a request may wait in the queue.
        max_calls: Calls in flight at once.
    """

    def __init__(
        self,
        call: Callable[[list[str]], Awaitable[list[dict[str, Any]]]],
        max_texts: int,
        max_wait_s: float,
        max_calls: int = 1,
    ) -> None:
        self._call = call
        self.max_texts = max_texts
        self.max_wait_s = max_wait_s
        self.max_calls = max_calls
        self._queue: collections.deque[tuple[list[str], asyncio.Future, float]] = (
            collections.deque()
        )
        self._in_flight = 0
        self.calls = 0  # calls made, for tests and debugging

    async def submit(self, texts: list[str]) -> list[dict[str, Any]]:
        """The rows of `texts`, from a call shared with whatever else was queued."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((texts, future, time.monotonic()))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        now = time.monotonic()
        while self._queue and self._in_flight < self.max_calls:
            jobs: list[tuple[list[str], asyncio.Future]] = []
            size = 0
            while self._queue:
                texts, future, queued = self._queue[0]
                if future.done():  # the client went away
                    self._queue.popleft()
                    continue
                if now - queued > self.max_wait_s:
                    self._queue.popleft()
                    future.set_exception(ServiceUnavailable("process is overloaded"))
                    continue
                if jobs and size + len(texts) > self.max_texts:
                    break
                self._queue.popleft()
                jobs.append((texts, future))
                size += len(texts)
            if not jobs:
                return
            self._in_flight += 1
            self.calls += 1
            asyncio.get_running_loop().create_task(self._run(jobs))

    async def _run(self, jobs: list[tuple[list[str], asyncio.Future]]) -> None:
        try:
            rows = await self._call([t for texts, _ in jobs for t in texts])
            start = 0
            for texts, future in jobs:
                if not future.done():
                    future.set_result(rows[start : start + len(texts)])
                start += len(texts)
        except Exception as err:
            for _, future in jobs:
                if not future.done():
                    future.set_exception(err)
        finally:
            self._in_flight -= 1
            self._dispatch()


def _check_tasks(tasks: list[str] | None, known: list[str]) -> list[str]:
    """The tasks to answer: all when None; 422 naming the valid ones for an unknown task (the
    first few unknown names, each cut short: the message stays small whatever was sent)."""
    if tasks is None:
        return known
    unknown = list(dict.fromkeys(t for t in tasks if t not in known))
    if unknown:
        shown = ", ".join(quote(t) for t in unknown[:MAX_REPORTED])
        more = f", ... ({len(unknown):,} in all)" if len(unknown) > MAX_REPORTED else ""
        raise RequestError(
            422,
            "unknown_task",
            f"tasks: unknown task(s) [{shown}{more}]; valid tasks are {known}",
        )
    return list(dict.fromkeys(tasks))
