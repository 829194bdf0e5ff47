"""Task data: readers for jsonl/csv/tsv, label vocabularies, fingerprints and statistics.

Readers fail early and say where: `data/sst2/train.jsonl:17: invalid JSON: ...`. Every problem in
every file is collected and raised together in one DataError.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig, TaskConfig

logger = logging.getLogger(__name__)

MAX_ERRORS_PER_FILE = 10


class DataError(Exception):
    """Unusable task data. `errors` holds one 'file:line: message' string per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass
class Split:
    """The examples of one file: texts and integer labels (index into the task's labels)."""

    path: Path
    texts: list[str]
    labels: np.ndarray  # int64 [n]
    # Indices of these examples among the file's rows, when some were dropped (decontaminate);
    # None: every row, in file order. Lets the feature cache serve a subset of a split.
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """One task: its label vocabulary and its loaded splits."""

    name: str
    labels: list[str]
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def read_rows(
    path: Path, fmt: str, text_field: str, label_field: str
) -> tuple[list[tuple[int, str, str]], list[str]]:
    """Read (line number, text, label) rows from one file.

    Returns:
        The good rows and one error string per bad row (at most MAX_ERRORS_PER_FILE, then a
        count of the rest).
    """
    if not path.is_file():
        return [], [f"{path}: file not found"]
    rows: list[tuple[int, str, str]] = []
    errors: list[str] = []
    n_bad = 0

    def bad(line: int, msg: str) -> None:
        nonlocal n_bad
        n_bad += 1
        if n_bad <= MAX_ERRORS_PER_FILE:
            errors.append(f"{path}:{line}: {msg}")

    def take(line: int, record: dict) -> None:
        missing = [f for f in (text_field, label_field) if f not in record]
        if missing:
            bad(line, f"missing field {missing[0]!r} (fields present: {sorted(record)})")
            return
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            bad(line, f"field {text_field!r} must be a string, got {type(text).__name__}")
            return
        if not text.strip():
            bad(line, f"field {text_field!r} is empty")
            return
        if isinstance(label, bool) or not isinstance(label, str | int):
            bad(line, f"field {label_field!r} must be a string or integer, got {label!r}")
            return
        label = str(label).strip()
        if not label:
            bad(line, f"field {label_field!r} is empty")
            return
        rows.append((line, text, label))

    try:
        with path.open(encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                for i, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw.rstrip("\r\n"))
                    except json.JSONDecodeError as err:
                        bad(i, f"invalid JSON: {err.msg} (column {err.colno})")
                        continue
                    if not isinstance(record, dict):
                        bad(i, f"expected a JSON object, got {type(record).__name__}")
                        continue
                    take(i, record)
            else:
                reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
                header = reader.fieldnames or []
                missing = [c for c in (text_field, label_field) if c not in header]
                if missing:
                    return [], [
                        f"{path}:1: header has no column {missing[0]!r} (columns: {header})"
                    ]
                for record in reader:
                    line = reader.line_num
                    if None in record:
                        bad(line, f"more values than the {len(header)} header columns")
                        continue
                    if any(v is None for v in record.values()):
                        bad(line, f"fewer values than the {len(header)} header columns")
                        continue
                    take(line, record)
    except UnicodeDecodeError as err:
        return [], [f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]
    if n_bad > MAX_ERRORS_PER_FILE:
        errors.append(f"{path}: ... and {n_bad - MAX_ERRORS_PER_FILE} more bad lines")
    return rows, errors


def _label_order(label: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order (2 before 10), then the rest alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def load_task(
    task: TaskConfig, data_root: Path | None, splits: Iterable[str] = ("train", "dev")
) -> TaskData:
    """Read and check one task's splits. The label vocabulary comes from `task.labels` if
    declared, else the sorted training labels.

    Raises:
        DataError: every problem found, each naming its file and line.
    """
    splits = list(splits)
    errors: list[str] = []
    read: dict[str, tuple[Path, list[tuple[int, str, str]]]] = {}
    for split in splits:
        path = task.split_path(split, data_root)
        rows, errs = read_rows(path, task.format, task.text_field, task.label_field)
        errors += errs
        if not rows and not errs:
            errors.append(f"{path}: no examples (task {task.name!r}, split {split!r})")
        read[split] = (path, rows)
    if errors:
        raise DataError(errors)

    if task.labels is not None:
        labels = list(task.labels)
        known = f"declared labels {labels}"
    elif "train" in read:
        labels = sorted({label for _, _, label in read["train"][1]}, key=_label_order)
        known = f"training labels {labels}"
        if len(labels) < 2:
            path = read["train"][0]
            errors.append(f"{path}: task {task.name!r} needs at least 2 labels, found {labels}")
    else:
        raise ValueError("without declared labels, the 'train' split is needed for the vocabulary")

    index = {label: i for i, label in enumerate(labels)}
    data = TaskData(name=task.name, labels=labels)
    for split, (path, rows) in read.items():
        n_bad = 0
        for line, _, label in rows:
            if label not in index:
                n_bad += 1
                if n_bad <= MAX_ERRORS_PER_FILE:
                    errors.append(f"{path}:{line}: label {label!r} is not among the {known}")
        if n_bad > MAX_ERRORS_PER_FILE:
            errors.append(f"{path}: ... and {n_bad - MAX_ERRORS_PER_FILE} more unknown labels")
        if not n_bad:
            data.splits[split] = Split(
                path=path,
                texts=[text for _, text, _ in rows],
                labels=np.array([index[label] for _, _, label in rows], dtype=np.int64),
            )
    if errors:
        raise DataError(errors)
    return data


def load_tasks(
    config: RunConfig,
    splits: Iterable[str] = ("train", "dev"),
    labels: dict[str, list[str]] | None = None,
) -> list[TaskData]:
    """Load every task of a run, collecting the errors of all tasks before raising.

    Args:
        labels: Fixed vocabularies per task (e.g. from a trained run), overriding the config's.
    """
    out: list[TaskData] = []
    errors: list[str] = []
    splits = list(splits)
    for task in config.tasks:
        if labels is not None and task.name in labels:
            task = task.model_copy(update={"labels": labels[task.name]})
        try:
            out.append(load_task(task, config.data_root, splits))
        except DataError as err:
            errors += err.errors
    if errors:
        raise DataError(errors)
    return out


def fingerprint_files(paths: Iterable[Path], extra: str = "") -> str:
    """sha256 over the files' bytes (in order) and `extra`; identifies a dataset version."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(str(p.name).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def texts_fingerprint(texts: list[str]) -> str:
    """sha256 of a list of texts: the key of their cached features."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def format_stats(tasks: list[TaskData]) -> str:
    """A table of examples and label shares per task and split, printed at the start of a run."""
    lines = [f"{'task':<10} {'split':<6} {'n':>7} {'mean words':>10}  labels (share)"]
    for t in tasks:
        for split, s in t.splits.items():
            counts = Counter(s.labels.tolist())
            shares = ", ".join(
                f"{t.labels[i]} {counts.get(i, 0) / max(len(s), 1):.0%}"
                for i in range(t.num_classes)
            )
            words = np.mean([len(x.split()) for x in s.texts]) if s.texts else 0.0
            lines.append(f"{t.name:<10} {split:<6} {len(s):>7} {words:>10.1f}  {shares}")
    return "\n".join(lines)


def normalize_text(text: str) -> str:
    """Lower-cased letters and digits only: `it 's` and `it's` compare equal."""
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def cross_task_overlap(tasks: list[TaskData]) -> list[dict[str, object]]:
    """Dev sentences of one task that appear (normalized) in another task's training data.

    Tasks cut from one corpus overlap: MR, SUBJ and SST-2 are all Rotten Tomatoes snippets, so a
    third of one's dev set can sit in another's training set. Joint training then sees those
    dev sentences, with labels of a related task, and dev scores overstate transfer.

    Returns:
        One {"dev_task", "train_task", "n", "n_dev", "share"} per overlapping pair.
    """
    train_sets = {t.name: {normalize_text(x) for x in t.splits["train"].texts} for t in tasks}
    out: list[dict[str, object]] = []
    for t in tasks:
        if "dev" not in t.splits:
            continue
        dev = {normalize_text(x) for x in t.splits["dev"].texts}
        for other, train in train_sets.items():
            n = len(dev & train) if other != t.name else 0
            if n:
                out.append(
                    {
                        "dev_task": t.name,
                        "train_task": other,
                        "n": n,
                        "n_dev": len(dev),
                        "share": n / len(dev),
                    }
                )
    return out


def decontaminate(tasks: list[TaskData]) -> dict[str, int]:
    """Drop training rows whose normalized text is a dev row of another task (in place).

    Returns:
        Rows removed per task.
    """
    dev_by_task = {
        t.name: {normalize_text(x) for x in t.splits["dev"].texts}
        for t in tasks
        if "dev" in t.splits
    }
    removed: dict[str, int] = {}
    for t in tasks:
        others = set().union(*(d for name, d in dev_by_task.items() if name != t.name))
        train = t.splits["train"]
        keep = [i for i, x in enumerate(train.texts) if normalize_text(x) not in others]
        removed[t.name] = len(train) - len(keep)
        if removed[t.name]:
            idx = np.asarray(keep, dtype=np.int64)
            t.splits["train"] = Split(
                path=train.path,
                texts=[train.texts[i] for i in keep],
                labels=train.labels[idx],
                rows=idx if train.rows is None else train.rows[idx],
            )
    return removed
