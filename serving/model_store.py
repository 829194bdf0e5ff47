"""The BentoML model store ($BENTOML_HOME/models) as polytask uses it: which model to serve,
promotion, the promotion history, and what to fall back to when a model does not load.

Which model the service loads:
    1. $POLYTASK_MODEL (or --model): a tag, `name:version` or `name` (= its latest version);
       pinned, so the service never swaps it (and never falls back from it).
    2. The promoted model: the version of the model name that carries the label
       `stage=production` (PROMOTION_LABEL). A promotion killed between labelling its target
       and unlabelling the others leaves two; the one the history recorded last counts.
    3. The latest version of the model name, leaving out candidates (`stage=candidate`,
       CANDIDATE_LABEL: the retraining job's challenger, registered before its gate) and
       incomplete versions (no metadata.json: a registration still copying, or interrupted).
The model name is $POLYTASK_MODEL_NAME, default `polytask-senteval6` (what `polytask export`
registers for configs/senteval6.yaml). When that model does not load, the service falls back to
`fallback_candidates()`: the versions promoted before it, newest promotion first, then the
others, newest first (candidates and incomplete versions left out here too).

Listing: a version directory BentoML cannot read (no or a bad model.yaml: a registration that
crashed, a stray directory) is skipped and logged once (`scan_versions`), so it never hides
the name's other versions; `polytask models list` shows it as `incomplete`.

Promotion (`promote`, `rollback`; the CLI's `polytask models` and the retraining job call them):
    - The artifact is loaded with the service's runtime and must answer known texts
      (`serving.runtime.load_checked`) before it is labelled: a broken model is refused with
      the reason, and never becomes what a restarted service looks for.
    - Every write (model.yaml labels, the history) happens under one lock file,
      $BENTOML_HOME/polytask/store.lock, and atomically (temporary file, fsync, rename): a
      reader (the service, `models list`, another promotion) sees the old file or the new one,
      never half of one. The new version is labelled before the others are unlabelled, so a
      reader always finds a promoted version; a promotion takes effect once its history line
      is written (see `current_promoted`).
    - The history, $BENTOML_HOME/polytask/promotions.jsonl, gets one JSON object per promotion:
      {"name", "tag", "at" (UTC ISO 8601), "by" ("retrain" | "promote" | "rollback"),
      "reason"}. It sits beside the store's `models/` directory, so BentoML never mistakes it
      for a model. A damaged line is reported as `file:line` (by `rollback`, which needs the
      history) and kept on its own line: nothing is ever appended onto it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

MODEL_ENV = "POLYTASK_MODEL"
MODEL_NAME_ENV = "POLYTASK_MODEL_NAME"
DEFAULT_MODEL_NAME = "polytask-senteval6"
PROMOTION_LABEL = ("stage", "production")
# The retraining job's challenger until its gate decides: promotion replaces the label (same
# key), and neither the "latest" policy nor the fallback ever serves a candidate.
CANDIDATE_LABEL = ("stage", "candidate")
# Which retraining job registered a candidate: a token whose lock file that job holds while it
# runs (`candidate_owner`), so that a candidate of a job killed outright can be told apart.
CANDIDATE_OWNER_LABEL = "candidate_owner"
OWNERS_DIR = Path("polytask") / "candidate-owners"
HISTORY_FILE = Path("polytask") / "promotions.jsonl"
LOCK_FILE = Path("polytask") / "store.lock"
DECISIONS_LOCK_FILE = Path("polytask") / "decisions.lock"
# A promotion holds the lock for a model load at most (rollback checks its target under it).
LOCK_TIMEOUT_S = 300.0
MODEL_YAML = "model.yaml"  # BentoML's model record (labels, metadata) in each version's directory

PromotedBy = Literal["retrain", "promote", "rollback"]
Source = Literal["pinned", "promoted", "latest", "fallback"]


class ModelNotFoundError(LookupError, ValueError):
    """No model to serve; the message says what was looked for and how to get one."""


class PromotionError(ValueError):
    """A promotion or rollback that cannot be done; the message says why."""


class HistoryError(PromotionError):
    """A damaged line in the promotion history; the message starts with `file:line`."""


@dataclass(frozen=True)
class UnreadableVersion:
    """A version directory that BentoML cannot read (no or a bad model.yaml).

    Attributes:
        tag: `name:<directory name>`.
        path: The directory.
        reason: BentoML's error.
    """

    tag: str
    path: Path
    reason: str


@dataclass(frozen=True)
class ResolvedModel:
    """A model in the store.

    Attributes:
        tag: `name:version`.
        path: The model's directory (the artifact).
        source: Why it was chosen: pinned by tag, promoted, the latest version, or a fallback
            for one that did not load.
    """

    tag: str
    path: Path
    source: Source

    @property
    def name(self) -> str:
        return self.tag.split(":", 1)[0]


@dataclass(frozen=True)
class Promotion:
    """One line of the promotion history."""

    name: str
    tag: str
    at: str
    by: str
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --------------------------------------------------------------------------- resolution
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
    versions = _versions(name)
    promoted = [m for m in versions if _is_promoted(m)]
    servable = promoted or [m for m in versions if _servable(m)]
    if not servable:
        skipped = _skipped_note(versions)
        raise ModelNotFoundError(
            f"no {'servable ' if skipped else ''}model named {name!r} in the model store "
            f"{_store_dir()}{skipped}: export one with `polytask export RUN --name {name}`"
            f"{', promote one with `polytask models promote TAG`' if skipped else ''}, or set "
            f"{MODEL_ENV} to a tag (`bentoml models list` shows what is there)"
        )
    if promoted:
        chosen = current_promoted(name, promoted)
    else:
        chosen = max(servable, key=lambda m: m.info.creation_time)
    return ResolvedModel(str(chosen.tag), Path(chosen.path), "promoted" if promoted else "latest")


def fallback_candidates(
    name: str, exclude: set[str] | frozenset[str] = frozenset()
) -> list[ResolvedModel]:
    """What to serve when the model `resolve_model` chose does not load, best first: the
    versions of `name` promoted before (newest promotion first, from the history), then the
    other versions (newest first); versions no longer in the store, candidates, incomplete
    versions and `exclude` left out.

    A damaged history line is logged and skipped here: the service must still start.
    """
    versions = {str(m.tag): m for m in _versions(name) if _servable(m)}
    order: list[str] = []
    for event in reversed(read_history(name, strict=False)):
        if event.tag in versions and event.tag not in order:
            order.append(event.tag)
    newest = sorted(versions.values(), key=lambda m: m.info.creation_time, reverse=True)
    order += [str(m.tag) for m in newest if str(m.tag) not in order]
    return [
        ResolvedModel(tag, Path(versions[tag].path), "fallback")
        for tag in order
        if tag not in exclude
    ]


def promoted_tag(name: str) -> str | None:
    """The version of `name` labelled `stage=production` (see `current_promoted` if several
    are)."""
    promoted = [m for m in _versions(name) if _is_promoted(m)]
    if not promoted:
        return None
    return str(current_promoted(name, promoted).tag)


# Sets of doubly labelled tags already logged by this process (each is logged once).
_reported_doubles: set[frozenset[str]] = set()


def current_promoted(name: str, promoted: list[Any]) -> Any:
    """The promoted version when several carry the label: the one whose promotion the history
    recorded last. A promotion labels its target, unlabels the others, then writes its history
    line; one killed in between leaves two labels, and it did not happen until its line is
    written. So every reader (service, replicas, rollback) agrees on the version promoted
    before; the next promote or rollback removes the stray label. Without any of them in the
    history, the newest created."""
    if len(promoted) == 1:
        return promoted[0]
    by_tag = {str(m.tag): m for m in promoted}
    chosen = None
    for event in reversed(read_history(name, strict=False)):
        if event.tag in by_tag:
            chosen = by_tag[event.tag]
            break
    if chosen is None:
        chosen = max(promoted, key=lambda m: m.info.creation_time)
    key = frozenset(by_tag)
    if key not in _reported_doubles:
        _reported_doubles.add(key)
        logger.warning(
            "model store: %d versions of %s are labelled %s=%s (%s), a promotion interrupted "
            "before its history line was written; %s counts, as the last recorded (the next "
            "`polytask models promote` or `rollback` removes the other labels)",
            len(promoted),
            name,
            *PROMOTION_LABEL,
            ", ".join(sorted(by_tag)),
            chosen.tag,
        )
    return chosen


# --------------------------------------------------------------------------- promotion
def promote(tag: str, by: PromotedBy = "promote", reason: str = "") -> str:
    """Check that `tag` loads and answers known texts, label it promoted (unlabelling the
    name's other versions) and record it in the history. A running service follows without
    a restart.

    Returns:
        The full tag.

    Raises:
        PromotionError: `tag` is not in the store, its model is broken (the reason is in
            the message), or a label or the history cannot be written (the file is named);
            nothing is changed then.
    """
    model = _get(tag)
    # Outside the lock: the artifact of a version never changes, and a load takes seconds.
    check_model(str(model.tag), Path(model.path))
    with store_lock():
        _label_and_record(str(model.tag), by, reason)
    logger.info("promoted %s (%s)", model.tag, by)
    return str(model.tag)


def rollback(name: str) -> str:
    """Promote the version of `name` promoted before the current one, as `kubectl rollout
    undo` does: two rollbacks in a row swap back.

    Returns:
        The tag promoted now.

    Raises:
        HistoryError: a damaged history line (`file:line` in the message).
        PromotionError: no earlier promoted version is still in the store, it is broken, or
            a label or the history cannot be written (nothing is changed then).
    """
    with store_lock():  # the target is chosen and promoted on one consistent view
        current = promoted_tag(name)
        present = {str(m.tag): m for m in _versions(name)}
        for event in reversed(read_history(name)):
            if event.tag != current and event.tag in present:
                target = present[event.tag]
                break
        else:
            raise PromotionError(
                f"{name}: no earlier promoted version to roll back to (current: {current}; "
                f"history {history_path()})"
            )
        check_model(str(target.tag), Path(target.path))
        _label_and_record(str(target.tag), "rollback", f"rollback from {current}")
    logger.info("rolled back %s: %s -> %s", name, current, target.tag)
    return str(target.tag)


def check_model(tag: str, path: Path) -> None:
    """Raise PromotionError unless the model loads with the service's runtime and answers
    known texts with probabilities (`serving.runtime.load_checked`)."""
    from serving.runtime import ModelCheckError, load_checked

    try:
        load_checked(path, version=tag)
    except ModelCheckError as err:
        detail = str(err).removeprefix(f"{tag}: ")
        raise PromotionError(f"{tag}: refused, the model is broken: {detail}") from None


@contextlib.contextmanager
def store_lock(timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the store's lock file (one promotion or rollback at a time, across processes).

    Raises:
        PromotionError: another promotion held the lock for `timeout` seconds.
    """
    from filelock import FileLock, Timeout

    path = bentoml_home() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise PromotionError(
            f"{path}: another promotion has held the store lock for {timeout:.0f} s"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _label_and_record(tag: str, by: str, reason: str) -> None:
    """Label `tag` promoted and record it in the history (lock held), or, when a file cannot be
    written (OSError: disk full, read-only volume), put every version's stage label back as
    it was and raise PromotionError naming the file: then nothing has changed."""
    name = tag.split(":", 1)[0]
    key, _ = PROMOTION_LABEL
    before = {str(m.tag): m.info.labels.get(key) for m in _versions(name)}
    try:
        _label_promoted(tag)
    except OSError as err:
        _restore_stages(name, before)
        raise PromotionError(
            f"{err.filename or tag}: cannot label {tag} promoted ({err.strerror or err}); "
            f"nothing was changed"
        ) from None
    try:
        _record(tag, by, reason)
    except OSError as err:
        _restore_stages(name, before)
        raise PromotionError(
            f"{history_path()}: cannot write the promotion history "
            f"({type(err).__name__}: {err.strerror or err}); {tag} was not promoted, nothing "
            f"was changed"
        ) from None


def _restore_stages(name: str, before: dict[str, str | None]) -> None:
    """Put back the stage label each version of `name` had (`before`: tag -> value or None)."""
    key, _ = PROMOTION_LABEL
    for model in _versions(name):
        old = before.get(str(model.tag))
        if model.info.labels.get(key) == old:
            continue
        if old is None:
            del model.info.labels[key]
        else:
            model.info.labels[key] = old
        try:
            _write_model_yaml(model)
        except OSError as err:
            logger.error("%s: cannot restore its stage label %r: %s", model.tag, old, err)


def _label_promoted(tag: str) -> None:
    """Label `tag` promoted, then unlabel the name's other versions (lock held)."""
    import bentoml

    key, value = PROMOTION_LABEL
    model = bentoml.models.get(tag)  # read again under the lock: the labels are current
    if model.info.labels.get(key) != value:
        model.info.labels[key] = value  # replaces `stage=candidate`
        _write_model_yaml(model)
    for other in _versions(model.tag.name):
        if other.tag != model.tag and _is_promoted(other):
            del other.info.labels[key]
            _write_model_yaml(other)


def _write_model_yaml(model: Any) -> None:
    """What `Model.flush()` writes (our models have no custom objects), but atomically:
    concurrent flushes of model.yaml are what made other processes read a malformed one."""
    buffer = io.StringIO()
    model.info.dump(buffer)
    atomic_write(Path(model.path) / MODEL_YAML, buffer.getvalue().encode())


def _record(tag: str, by: str, reason: str) -> None:
    """Add a promotion to the history (lock held): the file is rewritten atomically with the
    new line at the end, on a line of its own even after a damaged, unterminated last line."""
    path = history_path()
    data = path.read_bytes() if path.is_file() else b""
    for problem in _damaged_lines(path, data):
        logger.warning("%s (kept as is; the new promotion goes on a line of its own)", problem)
    if data and not data.endswith(b"\n"):
        data += b"\n"
    event = Promotion(
        name=tag.split(":", 1)[0],
        tag=tag,
        at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        by=by,
        reason=reason,
    )
    atomic_write(path, data + event.to_json().encode() + b"\n")


# --------------------------------------------------------------------------- candidates
@contextlib.contextmanager
def candidate_owner() -> Iterator[str]:
    """Mark the candidates this process registers as still awaiting their gate.

    A retraining job registers its challenger labelled `stage=candidate` and removes it when
    its gate does not promote it, whatever stopped the gate; but a SIGKILLed job (OOM killer,
    a pod's hard deadline) runs no clean-up. So the job holds an exclusive `flock` on
    `$BENTOML_HOME/polytask/candidate-owners/<token>.lock` while it runs and labels its
    candidate `candidate_owner=<token>`: the kernel frees the lock when the process dies, however
    it dies, and `remove_orphaned_candidates` (run when the next retraining job starts) deletes
    candidates whose owner's lock is free. On a shared store over NFS this needs working
    `flock` (NFSv4, or v3 with lockd).

    Yields:
        The token to label the candidate with (`CANDIDATE_OWNER_LABEL`).
    """
    import fcntl

    token = uuid.uuid4().hex
    path = bentoml_home() / OWNERS_DIR / f"{token}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh token: nobody else holds it
        yield token
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _owner_alive(token: str) -> bool:
    """Whether the process that labelled a candidate with `token` still holds its lock."""
    import fcntl

    if not re.fullmatch(r"[0-9a-f]{32}", token):
        return False  # not a token this code wrote: nothing can hold its lock
    path = bentoml_home() / OWNERS_DIR / f"{token}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False  # the owner finished (it removes its file) or a sweep removed it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also frees the lock if this process took it
    return False


def keep_candidate(tag: str) -> None:
    """Drop a candidate's owner label: its gate decided to keep it (refused, for `polytask
    models promote` to override), so it is no orphan when its job ends."""
    import bentoml

    with store_lock():
        model = bentoml.models.get(tag)
        if model.info.labels.pop(CANDIDATE_OWNER_LABEL, None) is not None:
            _write_model_yaml(model)


def remove_orphaned_candidates(name: str | None = None) -> list[str]:
    """Delete candidates (of `name`, or of every name) whose retraining job is gone.

    Only a candidate labelled `candidate_owner` whose owner no longer holds its lock
    (`candidate_owner`) is removed; a candidate of a running job, and one registered without
    an owner (by hand, or by polytask before session 25), is left alone. Each removal is
    decided under the store lock, on the version read again there: a gate that promoted the
    candidate meanwhile keeps it.

    Returns:
        The tags removed.
    """
    import bentoml

    removed: list[str] = []
    versions, _ = scan_versions(name)
    for model in versions:
        token = model.info.labels.get(CANDIDATE_OWNER_LABEL)
        if not _is_candidate(model) or token is None or _owner_alive(token):
            continue
        tag = str(model.tag)
        with store_lock():
            try:
                current = bentoml.models.get(tag)
            except Exception:
                continue  # deleted meanwhile
            if not _is_candidate(current) or _owner_alive(token):
                continue
            bentoml.models.delete(tag)
        removed.append(tag)
        with contextlib.suppress(OSError):
            (bentoml_home() / OWNERS_DIR / f"{token}.lock").unlink()
        logger.warning(
            "model store: removed candidate %s: the retraining job that registered it is gone "
            "(killed before its gate decided)",
            tag,
        )
    return removed


# --------------------------------------------------------------------------- history
def bentoml_home() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def decisions_lock_path() -> Path:
    """The lock file under which retraining jobs read back and push the decision counter
    (pipeline.jobs.monitoring): jobs of one config share the store, not always a machine."""
    return bentoml_home() / DECISIONS_LOCK_FILE


def history_path() -> Path:
    """The promotion history file of the current BentoML home."""
    return bentoml_home() / HISTORY_FILE


def read_history(name: str | None = None, strict: bool = True) -> list[Promotion]:
    """Promotions, oldest first (only `name`'s when given).

    Args:
        name: Keep only this model name's promotions.
        strict: Raise on a damaged line; otherwise log it and skip it.

    Raises:
        HistoryError: (strict) a line that is not a promotion record, as `file:line: why`.
    """
    path = history_path()
    if not path.is_file():
        return []
    events: list[Promotion] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            event = _parse_line(raw)
        except ValueError as err:
            message = f"{path}:{number}: damaged promotion record ({err})"
            if strict:
                raise HistoryError(
                    f"{message}; fix or delete that line (the other lines are intact)"
                ) from None
            logger.warning("%s; skipped", message)
            continue
        if name is None or event.name == name:
            events.append(event)
    return events


def _parse_line(raw: bytes) -> Promotion:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fields = ("name", "tag", "at", "by")
    missing = [f for f in fields if not isinstance(data.get(f), str)]
    if missing:
        raise ValueError(f"missing or non-string {', '.join(missing)}")
    return Promotion(*(data[f] for f in fields), reason=str(data.get("reason", "")))


def _damaged_lines(path: Path, data: bytes) -> list[str]:
    problems = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            try:
                _parse_line(raw)
            except ValueError as err:
                problems.append(f"{path}:{number}: damaged promotion record ({err})")
    return problems


# --------------------------------------------------------------------------- helpers
def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a temporary sibling, fsync, rename, fsync of the directory.
    A reader sees the old content or the new, and a crash leaves one of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# An absolute POSIX path (or ~/...): a '/' that does not follow a word character, ':', '.' or
# another '/' (so URLs and relative names are left alone), up to whitespace or a quote; a
# trailing punctuation mark is left outside.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.-])~?/[^\s'\"]*[^\s'\".,:;)\]]")


def redact_paths(text: str, names: dict[str, str] | None = None) -> str:
    """`text` without filesystem paths, for HTTP bodies (logs keep the paths).

    Args:
        text: A message, e.g. an exception's.
        names: Known paths -> what to say instead (e.g. a model's directory -> its tag).
    """
    for path, name in sorted((names or {}).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    with contextlib.suppress(Exception):  # the store may not be configured
        text = text.replace(_store_dir(), "the model store")
        text = text.replace(str(bentoml_home()), "$BENTOML_HOME")
    return _ABSOLUTE_PATH.sub("<path>", text)


def _get(tag: str) -> Any:
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(tag)
    except (NotFound, BentoMLException, ValueError) as err:
        raise PromotionError(f"{tag!r}: not in the model store ({err})") from None


def _versions(name: str) -> list[Any]:
    """The versions of `name` that BentoML can read (see `scan_versions`)."""
    return scan_versions(name)[0]


# Unreadable version directories already logged by this process (each is logged once).
_reported_unreadable: set[Path] = set()


def scan_versions(name: str | None = None) -> tuple[list[Any], list[UnreadableVersion]]:
    """The versions of `name` (of every name when None), each version directory read on its
    own: BentoML's `models.list` raises on the first unreadable one, which would hide all the
    others. Unreadable directories are returned apart and logged once per process.

    Returns:
        The readable versions (`bentoml.Model`s) and the unreadable ones.
    """
    import bentoml

    root = Path(_store_dir())
    if name is not None:
        names = [name]
    elif root.is_dir():
        names = sorted(d.name for d in root.iterdir() if d.is_dir())
    else:
        names = []
    models: list[Any] = []
    unreadable: list[UnreadableVersion] = []
    for n in names:
        base = root / n
        directories = sorted(d for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
        for directory in directories:
            tag = f"{n}:{directory.name}"
            try:
                model = bentoml.models.get(tag)
                if model.tag.name != n or model.tag.version != directory.name:
                    raise ValueError(f"its model.yaml is the record of {model.tag}")
            except Exception as err:
                unreadable.append(UnreadableVersion(tag, directory, f"{err}"))
                if directory not in _reported_unreadable:
                    _reported_unreadable.add(directory)
                    logger.warning(
                        "model store: skipped %s, not a readable version (%s): a registration "
                        "in progress or interrupted, or a stray directory; delete it once no "
                        "export is running",
                        directory,
                        err,
                    )
                continue
            models.append(model)
    return models, unreadable


def is_incomplete(model: Any) -> bool:
    """A version without the artifact's metadata.json: BentoML is still copying it, or a
    registration was interrupted."""
    from serving.artifact import METADATA_FILE

    return not (Path(model.path) / METADATA_FILE).is_file()


def _is_promoted(model: Any) -> bool:
    key, value = PROMOTION_LABEL
    return model.info.labels.get(key) == value


def _is_candidate(model: Any) -> bool:
    key, value = CANDIDATE_LABEL
    return model.info.labels.get(key) == value


def _servable(model: Any) -> bool:
    """Whether the "latest" policy and the fallback may serve `model`."""
    return not _is_candidate(model) and not is_incomplete(model)


def _skipped_note(versions: list[Any]) -> str:
    """Why none of `versions` is servable ("" when there are none)."""
    candidates = sum(1 for m in versions if _is_candidate(m))
    incomplete = sum(1 for m in versions if not _is_candidate(m) and is_incomplete(m))
    parts = []
    if candidates:
        parts.append(f"{candidates} candidate(s) awaiting the promotion gate")
    if incomplete:
        parts.append(f"{incomplete} incomplete version(s) (no metadata.json)")
    return f" (only {' and '.join(parts)})" if parts else ""


# --------------------------------------------------------------------------- load failures
def version_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What a version directory holds now: (relative path, size, mtime_ns) of each file. A
    version seen half-copied, or repaired, has another signature than when it failed."""
    files = []
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            file = Path(dirpath) / filename
            with contextlib.suppress(OSError):
                st = file.lstat()
                files.append((str(file.relative_to(path)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(files))


@dataclass(frozen=True)
class LoadFailure:
    """A version that failed to load or to answer known texts.

    Attributes:
        reason: Why, without filesystem paths (for HTTP bodies).
        signature: `version_signature` of its directory before the failed load.
        at: `time.monotonic()` of the failure.
    """

    reason: str
    signature: tuple[tuple[str, int, int], ...]
    at: float

    def retry_due(self, path: Path, retry_after_s: float) -> bool:
        """Whether to try the version again: its files changed (it was still being copied),
        or `retry_after_s` passed (the failure may have been transient, e.g. memory)."""
        return (
            time.monotonic() - self.at >= retry_after_s or version_signature(path) != self.signature
        )


def _store_dir() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.model_store_dir.get())
