"""Model store operations for operators: list versions, promote one, roll back.

Promotion, rollback and the promotion history live in `serving.model_store`, the store's one
owner, because the service reads the history too (to fall back to the last good promoted
version when the promoted one does not load). They are re-exported here for the CLI and the
retraining job. `promote` loads the model with the service's runtime and has it answer known
texts before labelling it; every store write is locked and atomic (see serving/model_store.py).

`rollback(name)` promotes the most recently promoted version of `name` that is not the
current one and is still in the store, as `kubectl rollout undo` does: two rollbacks in a row
swap back.

`list_versions` reads each version directory on its own (`serving.model_store.scan_versions`):
one that BentoML cannot read (no model.yaml) or that has no metadata.json (a registration
still copying, or interrupted) is listed with stage `incomplete`, and the others as usual.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from serving.model_store import (
    PROMOTION_LABEL,
    HistoryError,
    PromotionError,
    current_promoted,
    history_path,
    is_incomplete,
    promote,
    promoted_tag,
    read_history,
    rollback,
    scan_versions,
)

__all__ = [
    "HistoryError",
    "ModelVersion",
    "PromotionError",
    "format_versions",
    "history_path",
    "list_versions",
    "promote",
    "promoted_tag",
    "read_history",
    "rollback",
]


@dataclass(frozen=True)
class ModelVersion:
    """One version in the store, as `polytask models list` shows it.

    Attributes:
        tag: `name:version`.
        created: Creation time, UTC.
        stage: The `stage` label (`production` for the promoted version, `candidate` for a
            retraining job's challenger awaiting its gate), `incomplete` for a version
            directory without model.yaml or metadata.json, or None.
        dev_macro_accuracy: The run's dev macro-average accuracy from the model's metadata.
        run_id: The run the model was exported from.
        lineage: `<parent run> +added -removed` for a model made by add-task / remove-task.
    """

    tag: str
    created: dt.datetime
    stage: str | None
    dev_macro_accuracy: float | None
    run_id: str | None
    lineage: str | None = None


def list_versions(name: str | None = None) -> list[ModelVersion]:
    """Every version in the store (of `name` when given), oldest first; unreadable and
    half-copied ones with stage `incomplete` (an unreadable one dated by its directory), and a
    `production` label an interrupted promotion left beside the one that counts as `stale`."""
    models, unreadable = scan_versions(name)
    key, value = PROMOTION_LABEL
    labelled: dict[str, list[Any]] = {}
    for m in models:
        if m.info.labels.get(key) == value:
            labelled.setdefault(m.tag.name, []).append(m)
    current = {str(current_promoted(n, ms).tag) for n, ms in labelled.items()}

    def stage(m: Any) -> str | None:
        if is_incomplete(m):
            return "incomplete"
        label = m.info.labels.get(key)
        return "stale" if label == value and str(m.tag) not in current else label

    out = [
        ModelVersion(
            tag=str(m.tag),
            created=m.info.creation_time,
            stage=stage(m),
            dev_macro_accuracy=m.info.metadata.get("dev_macro_accuracy"),
            run_id=m.info.labels.get("run_id"),
            lineage=m.info.metadata.get("lineage"),
        )
        for m in models
    ]
    for u in unreadable:
        try:
            mtime = u.path.stat().st_mtime
        except OSError:  # removed since it was listed
            continue
        created = dt.datetime.fromtimestamp(mtime, dt.UTC)
        out.append(ModelVersion(u.tag, created, "incomplete", None, None))
    return sorted(out, key=lambda v: (v.created, v.tag))


def format_versions(versions: list[ModelVersion]) -> str:
    """The `polytask models list` table."""
    lines = [f"{'tag':<40} {'created (UTC)':<20} {'stage':<11} {'dev macro':>9}  lineage"]
    for v in versions:
        macro = f"{v.dev_macro_accuracy:.2f}" if v.dev_macro_accuracy is not None else "-"
        created = v.created.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        lineage = v.lineage or "-"
        lines.append(f"{v.tag:<40} {created:<20} {v.stage or '-':<11} {macro:>9}  {lineage}")
    return "\n".join(lines)
