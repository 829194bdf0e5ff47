"""Loading a finished run directory back into a model (evaluation, affinity, export)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, parse_config
from pipeline.features import encoder_fingerprint
from pipeline.train.driver import MODEL_DIR, MODEL_FILE, RUN_RECORD

logger = logging.getLogger(__name__)


class RunNotFoundError(Exception):
    """The path is not a finished polytask run."""


@dataclass
class LoadedRun:
    run_dir: Path
    record: dict[str, Any]
    config: RunConfig
    model: Any  # pipeline.model.MultiTaskModel, in eval mode

    @property
    def labels(self) -> dict[str, list[str]]:
        return {t: v["labels"] for t, v in self.record["tasks"].items()}


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        raise RunNotFoundError(
            f"{run_dir}: not a finished run (no {RUN_RECORD}); `polytask train` prints the run "
            "directory when it finishes"
        )
    return json.loads(path.read_text())


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run's MultiTaskModel (encoder + selected heads) and its record.

    A frozen-encoder run refers to its encoder by path; the encoder's fingerprint is checked so
    a changed encoder directory is an error, not silently different predictions.
    """
    from pipeline.model import MultiTaskModel, build_heads, load_encoder
    from pipeline.train.checkpoint import load_tensors

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    config = parse_config(record["config"], str(run_dir / RUN_RECORD))
    enc = record["encoder"]
    if not Path(enc["path"]).exists():
        raise RunNotFoundError(f"{run_dir}: the run's encoder is missing: {enc['path']}")
    if encoder_fingerprint(enc["path"]) != enc["fingerprint"]:
        raise RunNotFoundError(
            f"{run_dir}: the encoder at {enc['path']} changed since training (fingerprint "
            "mismatch); evaluate with the encoder the run was trained on"
        )
    encoder = load_encoder(enc["path"], enc["pooling"])
    heads = build_heads(
        int(enc["dim"]),
        {t: len(v["labels"]) for t, v in record["tasks"].items()},
        config.shared,
        config.towers,
        config.aux,
    )
    model = MultiTaskModel(encoder, heads)
    state = load_tensors(run_dir / MODEL_DIR / MODEL_FILE)
    # Frozen runs store only the heads; the encoder weights are the pretrained ones.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise RunNotFoundError(
            f"{run_dir}: model weights do not match the run's config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return LoadedRun(run_dir=run_dir, record=record, config=config, model=model)
