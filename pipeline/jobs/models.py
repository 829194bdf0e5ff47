"""Model store operations for operators: list versions, promote one, roll back.

Promotion itself is `serving.model_store.promote` (the label `stage=production`, which the
service follows without a restart). This module adds a promotion history so that `rollback`
knows which version was promoted before the current one:

    $BENTOML_HOME/polytask/promotions.jsonl

one JSON object per promotion, appended: {"name", "tag", "at" (UTC ISO 8601), "by"
("retrain" | "promote" | "rollback"), "reason"}. The file sits beside the store's `models/`
directory, not inside it, so BentoML never mistakes it for a model.

`rollback(name)` promotes the most recently promoted version of `name` that is not the
current one and is still in the store, as `kubectl rollout undo` does: two rollbacks in a row
swap back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from serving.model_store import PROMOTION_LABEL
from serving.model_store import promote as label_promoted

logger = logging.getLogger(__name__)

HISTORY_FILE = Path("polytask") / "promotions.jsonl"
PromotedBy = Literal["retrain", "promote", "rollback"]


class PromotionError(ValueError):
    """A promotion or rollback that cannot be done; the message says why."""


@dataclass(frozen=True)
class ModelVersion:
    """One version in the store, as `polytask models list` shows it.

    Attributes:
        tag: `name:version`.
        created: Creation time, UTC.
        stage: The `stage` label (`production` for the promoted version), or None.
        dev_macro_accuracy: The run's dev macro-average accuracy from the model's metadata.
        run_id: The run the model was exported from.
    """

    tag: str
    created: dt.datetime
    stage: str | None
    dev_macro_accuracy: float | None
    run_id: str | None


def history_path() -> Path:
    """The promotion history file of the current BentoML home."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get()) / HISTORY_FILE


def read_history(name: str | None = None) -> list[dict[str, Any]]:
    """Promotions, oldest first (only `name`'s when given)."""
    path = history_path()
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if name is None or e["name"] == name]


def list_versions(name: str | None = None) -> list[ModelVersion]:
    """Every version in the store (of `name` when given), oldest first."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:
        models = []
    key, _ = PROMOTION_LABEL
    out = [
        ModelVersion(
            tag=str(m.tag),
            created=m.info.creation_time,
            stage=m.info.labels.get(key),
            dev_macro_accuracy=m.info.metadata.get("dev_macro_accuracy"),
            run_id=m.info.labels.get("run_id"),
        )
        for m in models
    ]
    return sorted(out, key=lambda v: (v.created, v.tag))


def promoted_tag(name: str) -> str | None:
    """The version of `name` labelled `stage=production` (the newest, if several are)."""
    _, value = PROMOTION_LABEL
    promoted = [v for v in list_versions(name) if v.stage == value]
    return promoted[-1].tag if promoted else None


def promote(tag: str, by: PromotedBy = "promote", reason: str = "") -> str:
    """Promote `tag` (the service follows without a restart) and record it in the history.

    Returns:
        The full tag.

    Raises:
        PromotionError: `tag` is not in the store.
    """
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        full = str(bentoml.models.get(tag).tag)
    except (NotFound, BentoMLException, ValueError) as err:
        raise PromotionError(f"{tag!r}: not in the model store ({err})") from None
    label_promoted(full)
    event = {
        "name": full.split(":", 1)[0],
        "tag": full,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "by": by,
        "reason": reason,
    }
    path = history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(event) + "\n")
    return full


def rollback(name: str) -> str:
    """Promote the version of `name` promoted before the current one (see module docstring).

    Returns:
        The tag promoted now.

    Raises:
        PromotionError: the history holds no other version of `name` still in the store.
    """
    current = promoted_tag(name)
    present = {v.tag for v in list_versions(name)}
    for event in reversed(read_history(name)):
        if event["tag"] != current and event["tag"] in present:
            return promote(event["tag"], by="rollback", reason=f"rollback from {current}")
    raise PromotionError(
        f"{name}: no earlier promoted version to roll back to (current: {current}; history "
        f"{history_path()})"
    )


def format_versions(versions: list[ModelVersion]) -> str:
    """The `polytask models list` table."""
    lines = [f"{'tag':<40} {'created (UTC)':<20} {'stage':<11} {'dev macro':>9}"]
    for v in versions:
        macro = f"{v.dev_macro_accuracy:.2f}" if v.dev_macro_accuracy is not None else "-"
        created = v.created.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{v.tag:<40} {created:<20} {v.stage or '-':<11} {macro:>9}")
    return "\n".join(lines)
