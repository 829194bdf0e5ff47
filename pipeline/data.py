"""Task data: readers for jsonl/csv/tsv, label vocabularies, fingerprints and statistics.

Readers fail early and say where: `data/sst2/train.jsonl:17: invalid JSON: ...`. Every problem in
every file is collected and raised together in one DataError.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.config import DataLimitsConfig, RunConfig, TaskConfig

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


class LabelKindCheck:
    """One task's label column holds one kind of value, across all its files.

    Every label is a JSON integer or every label is a string (jsonl), and, unless the task
    declares its `labels`, every label is a number or every label is a name: `0`/`1` mixed with
    `negative`/`positive` would otherwise train a silent 4-class task. A label of another kind
    than the task's first one is an error at its own file and line.
    """

    def __init__(self, declared: bool = False):
        self.declared = declared
        self.first: tuple[Path, int, str | int] | None = None

    def check(self, path: Path, line: int, label: str | int) -> str | None:
        """The error for `label` at path:line, or None when it is of the task's kind."""
        if self.first is None:
            self.first = (path, line, label)
            return None
        path0, line0, label0 = self.first
        where = f"line {line0}" if path0 == path else f"{path0}:{line0}"
        if isinstance(label, int) != isinstance(label0, int):
            return (
                f"label {label!r} is {_json_type(label)} but the task's first label "
                f"{label0!r} ({where}) is {_json_type(label0)}: one task's labels must be all "
                "integers or all strings"
            )
        if not self.declared and _is_number(label) != _is_number(label0):
            return (
                f"label {label!r} is {_shape(label)} but the task's first label {label0!r} "
                f"({where}) is {_shape(label0)}: numbers and names in one column would train as "
                "separate classes; fix the data, or declare the task's `labels` if both are meant"
            )
        return None


def _json_type(label: str | int) -> str:
    return "an integer" if isinstance(label, int) else "a string"


def _is_number(label: str | int) -> bool:
    return isinstance(label, int) or re.fullmatch(r"[+-]?\d+(\.\d+)?", label.strip()) is not None


def _shape(label: str | int) -> str:
    return "a number" if _is_number(label) else "a name"


def _physical_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line with its newline) for each line of a binary file; None instead of
    a line longer than `max_bytes` (newline excluded), which is skipped in 64 KiB chunks: no more
    than `max_bytes` + 2 bytes of a line are ever held."""
    for number in itertools.count(1):
        raw = f.readline(max_bytes + 2)  # room for the longest line, "\r" and "\n"
        if not raw:
            return
        if len(raw) == max_bytes + 2 and not raw.endswith(b"\n"):
            while chunk := f.readline(1 << 16):
                if chunk.endswith(b"\n"):
                    break
            yield number, None
            continue
        length = len(raw)
        if raw.endswith(b"\n"):
            length -= 2 if raw.endswith(b"\r\n") else 1
        elif raw.endswith(b"\r"):
            length -= 1
        yield number, raw if length <= max_bytes else None


def _not_utf8(err: UnicodeDecodeError) -> str:
    return (
        f"not UTF-8 text ({err.reason} at byte {err.start} of the line); the rest of the file "
        "was not read"
    )


class _DuplicateKey(ValueError):
    """A JSON object that gives one key twice (json.loads would keep the last silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate (a `\\ud800` escape with no pair) in `text`;
    None when `text` is valid Unicode text (encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


class _StopFile(Exception):
    """A problem after which the rest of a csv/tsv file cannot be read reliably."""

    def __init__(self, line: int, message: str):
        self.line = line
        self.message = message
        super().__init__(message)


def read_rows(
    path: Path,
    fmt: str,
    text_field: str,
    label_field: str,
    limits: DataLimitsConfig | None = None,
    label_kinds: LabelKindCheck | None = None,
) -> tuple[list[tuple[int, str, str]], list[str]]:
    """Read (line number, text, label) rows from one file.

    Lines are read with a bounded read: a line over `limits.max_line_bytes` is an error at its
    line and is never held whole (jsonl goes on with the next line; csv/tsv stops, since a
    quoted field may span lines).

    Args:
        limits: Line and text size limits (default: DataLimitsConfig's defaults).
        label_kinds: The task's label kind check, shared by its files (default: this file's).

    Returns:
        The good rows and one error string per bad row (at most MAX_ERRORS_PER_FILE, then a
        count of the rest).
    """
    if not path.is_file():
        if path.is_dir():
            return [], [f"{path}: is a directory, not a data file"]
        if path.is_symlink():
            return [], [f"{path}: a broken symlink (or a symlink loop)"]
        return [], [f"{path}: file not found"]
    limits = limits or DataLimitsConfig()
    label_kinds = label_kinds or LabelKindCheck()
    max_bytes = limits.max_line_bytes
    too_long = f"line longer than data_limits.max_line_bytes ({max_bytes:,} bytes)"
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
        for name, value in ((text_field, text), (label_field, label)):
            at = _lone_surrogate(value) if isinstance(value, str) else None
            if at is not None:
                bad(
                    line,
                    f"field {name!r} has a lone surrogate escape ({value[at]!r}) at character "
                    f"{at}: not valid Unicode text",
                )
                return
        if len(text) > limits.max_text_chars:
            bad(
                line,
                f"field {text_field!r} has {len(text):,} characters, more than "
                f"data_limits.max_text_chars ({limits.max_text_chars:,})",
            )
            return
        if isinstance(label, bool) or not isinstance(label, str | int):
            bad(line, f"field {label_field!r} must be a string or integer, got {label!r}")
            return
        if not str(label).strip():
            bad(line, f"field {label_field!r} is empty")
            return
        mixed = label_kinds.check(path, line, label)
        if mixed:
            bad(line, mixed)
            return
        rows.append((line, text, str(label).strip()))

    with path.open("rb") as f:
        if fmt == "jsonl":
            for i, raw in _physical_lines(f, max_bytes):
                if raw is None:
                    bad(i, too_long)
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad(i, _not_utf8(err))
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"), object_pairs_hook=_unique_keys)
                except json.JSONDecodeError as err:
                    bad(i, f"invalid JSON: {err.msg} (column {err.colno})")
                    continue
                except _DuplicateKey as err:
                    bad(i, f"field {err.args[0]!r} is given twice")
                    continue
                except RecursionError:
                    bad(i, "invalid JSON: nested too deeply")
                    continue
                except ValueError:  # an integer over Python's 4,300-digit limit
                    bad(i, f"invalid JSON: a number over {sys.get_int_max_str_digits():,} digits")
                    continue
                if not isinstance(record, dict):
                    bad(i, f"expected a JSON object, got {type(record).__name__}")
                    continue
                take(i, record)
        else:
            record_bytes = 0  # of the csv record being read, which may span lines
            last_line = 0

            def text_lines() -> Iterator[str]:
                nonlocal record_bytes, last_line
                for i, raw in _physical_lines(f, max_bytes):
                    last_line = i
                    if raw is None:
                        raise _StopFile(i, f"{too_long}; the rest of the file was not read")
                    record_bytes += len(raw)
                    if record_bytes > max_bytes + 2:
                        raise _StopFile(
                            i,
                            f"record longer than data_limits.max_line_bytes ({max_bytes:,} "
                            "bytes); the rest of the file was not read",
                        )
                    try:
                        yield raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise _StopFile(i, _not_utf8(err)) from None

            # csv.reader, not DictReader: each record's first line must be known (reader.line_num
            # is its last), to name where a quote went wrong rather than where the file ended.
            reader = csv.reader(text_lines(), delimiter="\t" if fmt == "tsv" else ",")
            ended = 0  # the last line of the previous record (or blank line)
            header: list[str] | None = None
            try:
                for values in reader:
                    record_bytes = 0
                    start, end = ended + 1, reader.line_num
                    ended = end
                    if not values:  # a blank line
                        continue
                    where = f" (the record runs from line {start} to line {end})"
                    spans = end > start
                    if header is None:
                        header = values
                        missing = [c for c in (text_field, label_field) if c not in header]
                        if missing:
                            return [], [
                                f"{path}:{start}: header has no column {missing[0]!r} "
                                f"(columns: {header})"
                            ]
                        twice = sorted({c for c in header if header.count(c) > 1})
                        if twice:
                            return [], [
                                f"{path}:{start}: header names column(s) {twice} more than once"
                            ]
                        continue
                    if spans and fmt == "tsv":
                        # TSV has one record per line. A text that starts with `"` opens a quoted
                        # field, which would otherwise swallow the next lines, labels and all.
                        bad(
                            start,
                            f"a quoted field runs from line {start} to line {end}: in tsv a "
                            "record is one line; a text that starts with a double quote must be "
                            'quoted whole, with its quotes doubled ("""a"" b" for "a" b)',
                        )
                        continue
                    if len(values) > len(header):
                        bad(
                            start,
                            f"more values than the {len(header)} header columns"
                            + (where if spans else ""),
                        )
                        continue
                    if len(values) < len(header):
                        bad(
                            start,
                            f"fewer values than the {len(header)} header columns"
                            + (where + ": an unclosed quote?" if spans else ""),
                        )
                        continue
                    take(start, dict(zip(header, values, strict=True)))
                if header is None:
                    return [], [f"{path}:1: no header row (the file has no {fmt} records)"]
            except _StopFile as err:
                bad(err.line, err.message)
            except csv.Error as err:
                bad(last_line, f"malformed {fmt}: {err}; the rest of the file was not read")
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
    task: TaskConfig,
    data_root: Path | None,
    splits: Iterable[str] = ("train", "dev"),
    limits: DataLimitsConfig | None = None,
) -> TaskData:
    """Read and check one task's splits. The label vocabulary comes from `task.labels` if
    declared, else the sorted training labels.

    Args:
        limits: Line and text size limits (default: DataLimitsConfig's defaults).

    Raises:
        DataError: every problem found, each naming its file and line.
    """
    splits = list(splits)
    errors: list[str] = []
    read: dict[str, tuple[Path, list[tuple[int, str, str]]]] = {}
    kinds = LabelKindCheck(declared=task.labels is not None)
    for split in splits:
        path = task.split_path(split, data_root)
        rows, errs = read_rows(
            path, task.format, task.text_field, task.label_field, limits, label_kinds=kinds
        )
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
            out.append(load_task(task, config.data_root, splits, config.data_limits))
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


def warn_large_batch(tasks: list[TaskData], batch_size: int) -> list[str]:
    """Log a warning for each task whose training set is smaller than one batch.

    Legal, but every batch of such a task is its whole training set (per worker), so it trains
    on fewer examples per step than `train.batch_size` says.

    Returns:
        The names of those tasks.
    """
    small = []
    for t in tasks:
        n = len(t.splits["train"]) if "train" in t.splits else None
        if n is not None and n < batch_size:
            small.append(t.name)
            logger.warning(
                "task %r has %d training examples, fewer than train.batch_size %d: each of its "
                "batches is its whole training set",
                t.name,
                n,
                batch_size,
            )
    return small


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
