"""Per-task evaluation of a finished run on any data directory in the training layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import load_tasks
from pipeline.features import FeatureCache, encode_texts, load_tokenizer
from pipeline.metrics import classification_metrics, format_table, macro_average
from pipeline.runs import LoadedRun, load_run

logger = logging.getLogger(__name__)


def run_features(run: LoadedRun, texts: list[str], desc: str) -> np.ndarray:
    """Pooled features of `texts` under the run's encoder: from the feature cache when the
    encoder was frozen (its weights are the pretrained ones), else computed."""
    enc = run.record.encoder
    if not enc.fine_tuned:
        cache = FeatureCache(run.config.resolved_cache_dir(), enc.path, enc.max_length, enc.pooling)
        return cache.get(texts, desc=desc, batch_size=run.config.encoder.batch_size)
    tokenizer = load_tokenizer(enc.path)
    return encode_texts(run.model.encoder, tokenizer, texts, enc.max_length, desc=desc)


def predict_features(run: LoadedRun, task: str, features: np.ndarray) -> np.ndarray:
    """Class indices [n] of one task from pooled features [n, d]."""
    import torch

    with torch.inference_mode():
        logits, _ = run.model.heads(torch.from_numpy(features), task)
    return logits.argmax(dim=-1).numpy()


def evaluate_run(
    run_dir: str | Path, data_dir: str | Path | None = None, split: str = "dev"
) -> dict[str, Any]:
    """Accuracy and macro-F1 (percent) per task and their macro average.

    Args:
        run_dir: A finished run directory.
        data_dir: Directory with `<task>/<split>.<format>` per task; default: the run's data.
        split: File stem to read (dev, test, ...).

    Returns:
        {"run", "split", "data_dir", "tasks": {name: {"accuracy", "macro_f1", "n"}},
         "macro_average": {"accuracy", "macro_f1"}}
    """
    run = load_run(run_dir)
    config = run.config
    if data_dir is not None:
        root = Path(data_dir).expanduser().resolve()
        tasks = [
            t.model_copy(update={"data_dir": None, "train": None, "dev": None})
            for t in config.tasks
        ]
        config = config.model_copy(update={"data_root": root, "tasks": tasks})
    data = load_tasks(config, splits=[split], labels=run.labels)
    per_task = {}
    for t in data:
        s = t.splits[split]
        feats = run_features(run, s.texts, desc=f"features {t.name}/{split}")
        pred = predict_features(run, t.name, feats)
        per_task[t.name] = classification_metrics(s.labels, pred, t.num_classes)
    return {
        "run": run.record.run_name,
        "split": split,
        "data_dir": str(config.data_root),
        "tasks": per_task,
        "macro_average": macro_average(per_task),
    }


def format_results(results: dict[str, Any]) -> str:
    return format_table(results["tasks"], title=f"{results['run']} on {results['split']}:")
