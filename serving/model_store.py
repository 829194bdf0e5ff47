"""Which model the service loads, from the BentoML model store ($BENTOML_HOME/models).

Resolution order:
    1. $POLYTASK_MODEL (or --model): a tag, `name:version` or `name` (= its latest version);
       pinned, so the service never swaps it.
    2. The promoted model: the newest version of the model name that carries the label
       `stage=production` (PROMOTION_LABEL). The retraining job promotes with `promote(tag)`,
       which also takes the label off the name's other versions.
    3. The latest version of the model name.
The model name is $POLYTASK_MODEL_NAME, default `polytask-senteval6` (what `polytask export`
registers for configs/senteval6.yaml).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

MODEL_ENV = "POLYTASK_MODEL"
MODEL_NAME_ENV = "POLYTASK_MODEL_NAME"
DEFAULT_MODEL_NAME = "polytask-senteval6"
PROMOTION_LABEL = ("stage", "production")


class ModelNotFoundError(LookupError, ValueError):
    """No model to serve; the message says what was looked for and how to get one."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model in the store.

    Attributes:
        tag: `name:version`.
        path: The model's directory (the artifact).
        source: Why it was chosen: pinned by tag, promoted, or the latest version.
    """

    tag: str
    path: Path
    source: Literal["pinned", "promoted", "latest"]


def model_name(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get(MODEL_NAME_ENV, "").strip() or DEFAULT_MODEL_NAME


def resolve_model(tag: str | None = None, name: str | None = None) -> ResolvedModel:
    """The model to serve (see the module docstring for the order).

    Args:
        tag: A pinned tag; default $POLYTASK_MODEL.
        name: The model name for promoted/latest; default $POLYTASK_MODEL_NAME or
            `polytask-senteval6`.

    Raises:
        ModelNotFoundError: the pinned tag is not in the store, or the name has no version.
    """
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    tag = tag or os.environ.get(MODEL_ENV, "").strip() or None
    if tag:
        try:
            model = bentoml.models.get(tag)
        except (NotFound, BentoMLException, ValueError) as err:
            raise ModelNotFoundError(
                f"{MODEL_ENV}/--model {tag!r}: not in the model store {_store_dir()} ({err})"
            ) from None
        return ResolvedModel(str(model.tag), Path(model.path), "pinned")

    name = name or model_name()
    try:
        versions = bentoml.models.list(name)
    except (NotFound, BentoMLException):
        versions = []
    if not versions:
        raise ModelNotFoundError(
            f"no model named {name!r} in the model store {_store_dir()}: export one with "
            f"`polytask export RUN --name {name}`, or set {MODEL_ENV} to a tag "
            f"(`bentoml models list` shows what is there)"
        )
    key, value = PROMOTION_LABEL
    promoted = [m for m in versions if m.info.labels.get(key) == value]
    chosen = max(promoted or versions, key=lambda m: m.info.creation_time)
    return ResolvedModel(str(chosen.tag), Path(chosen.path), "promoted" if promoted else "latest")


def promote(tag: str) -> str:
    """Label `tag` as the promoted model of its name and unlabel the name's other versions.

    A running service picks the promoted model up at its next check (no restart).

    Returns:
        The full tag that was promoted.
    """
    import bentoml

    model = bentoml.models.get(tag)
    key, value = PROMOTION_LABEL
    for other in bentoml.models.list(model.tag.name):
        if other.tag != model.tag and other.info.labels.get(key) == value:
            del other.info.labels[key]
            other.flush()
    model.info.labels[key] = value
    model.flush()
    logger.info("promoted %s", model.tag)
    return str(model.tag)


def _store_dir() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.model_store_dir.get())
