"""What `polytask serve` and `polytask predict` do, as plain functions the CLI and tests call."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from serving.model_store import MODEL_ENV, ResolvedModel, fallback_candidates, resolve_model
from serving.runtime import ModelCheckError, Prediction, Runtime, load_checked
from serving.settings import API_KEYS_ENV, ServingSettings

logger = logging.getLogger(__name__)

SERVICE = "serving.service:Polytask"
REPO_ROOT = Path(__file__).resolve().parents[1]


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
        ModelNotFoundError: no model to serve (checked before any process starts).
    """
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
        ModelNotFoundError: no model to serve in the store.
        ModelCheckError: the model is broken and (unless pinned) no other version loads.
    """
    return _load_servable(resolve_model(tag=model)).predict(texts, return_all=False)


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
