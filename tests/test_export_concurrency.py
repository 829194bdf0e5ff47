"""Exports of one artifact directory at once, and what killed exports and registrations leave
behind (pipeline/export.py: `artifact_lock`, `remove_stale_temporaries`,
`remove_stale_bentoml_temporaries`; review findings L3 and L4). Offline, tiny dummy
artifacts, seconds. Claims checked:

- two processes that each write and publish an artifact into the same directory many times
  (what two `polytask export RUN --output DIR` do) see no error and leave no `.<name>.old-*`,
  `.<name>.tmp-*` or lock file behind;
- an export removes the temporaries killed exports of the same directory left (logged, with
  their size), and nothing else: not other names, not another output's, not links or files;
- an export of a directory another process is exporting fails after a short wait, naming the
  lock file and its holder, and removes none of that export's temporaries; a lock whose holder
  was killed is free, and its file is gone after the next export; on a file system without
  locks, exports go on unlocked as before;
- BentoML's temporary copy of a version is removed once the registration that marked it is
  dead (killed), never while it runs, and unmarked directories are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One cycle as `write_artifact` runs it around building the artifact: under the directory's
# lock, check it may be replaced, remove stale temporaries, build in a temporary sibling and
# publish it (the graph export, parity and calibration in between are replaced by one file).
RACE_WORKER = textwrap.dedent(
    """
    import json, sys, tempfile, time
    from pathlib import Path

    import pipeline.export as export

    out, k, n, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    export.ARTIFACT_LOCK_TIMEOUT_S = 60.0  # this test is about errors, not about the wait
    while not go.exists():
        time.sleep(0.001)
    errors = []
    for i in range(n):
        try:
            with export._locked_output(out):
                export._check_replaceable(out)
                export.remove_stale_temporaries(out)
                work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
                (work / "metadata.json").write_text(f"{k}-{i}")
                export._publish(work, out)
        except Exception as err:
            errors.append(f"{i}: {type(err).__name__}: {err}")
    print(json.dumps(errors))
    """
)

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from pipeline.export import artifact_lock

    with artifact_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes it (or kills this process)
    """
)

MARKER_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from pipeline.export import _bentoml_temp_marker

    with _bentoml_temp_marker(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def _held(script: str, path: Path) -> subprocess.Popen:
    """A process that holds a lock until its stdin closes."""
    proc = _python(script, str(path), stdin=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    return proc


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_concurrent_publishes_to_one_directory_neither_fail_nor_leave_copies(tmp_path):
    root = tmp_path / "exp"
    root.mkdir()
    out, go, n = root / "artifact", tmp_path / "go", 300
    workers = [_python(RACE_WORKER, str(out), str(k), str(n), str(go)) for k in range(2)]
    time.sleep(0.5)  # both import and wait for the start
    go.touch()
    errors = []
    for proc in workers:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        errors += json.loads(stdout.splitlines()[-1])
    assert errors == [], f"{len(errors)} of {2 * n} cycles failed, e.g. {errors[:3]}"
    assert _names(root) == ["artifact"], "leftovers beside the artifact"
    assert (out / "metadata.json").read_text().split("-")[1] == str(n - 1)


def _stale(folder: Path, name: str, size: int = 0) -> Path:
    path = folder / name
    path.mkdir()
    (path / "model.onnx").write_bytes(b"x" * size)
    return path


def test_an_export_removes_temporaries_left_by_killed_exports_and_nothing_else(tmp_path, caplog):
    from pipeline.export import write_artifact
    from pipeline.runs import RunNotFoundError

    exp = tmp_path / "exp"
    exp.mkdir()
    out = exp / "art"
    stale = [
        _stale(exp, ".art.tmp-ab_d12z4", size=2_000_000),  # a killed export's partial artifact
        _stale(exp, ".art.old-0123abcd"),  # an earlier artifact a failed swap left behind
    ]
    elsewhere = tmp_path / "elsewhere"
    _stale(tmp_path, "elsewhere")
    kept = [
        _stale(exp, ".art.tmp-notes"),  # not a name of ours: wrong suffix
        _stale(exp, ".art.tmp-abcd12345"),
        _stale(exp, ".art.old-0123ABCD"),
        _stale(exp, ".art2.tmp-abcd1234"),  # another output's
        _stale(exp, ".ar.tmp-abcd1234"),
        _stale(exp, "art.tmp-abcd1234"),  # not hidden
        _stale(exp, "notes"),
    ]
    (exp / ".art.old-deadbeef").write_text("a file, not one of our directories")
    (exp / ".art.tmp-link0000").symlink_to(elsewhere, target_is_directory=True)
    before = set(_names(exp)) - {p.name for p in stale}

    caplog.set_level(logging.WARNING, logger="pipeline.export")
    # The run does not exist: the export fails after its checks and the cleanup, fast.
    with pytest.raises(RunNotFoundError):
        write_artifact(tmp_path / "no-run", out)
    assert set(_names(exp)) == before
    assert all(p.is_dir() for p in kept) and (elsewhere / "model.onnx").is_file()
    assert (exp / ".art.tmp-link0000").is_symlink()
    logged = caplog.text
    assert f"removed {stale[0]} (2.0 MB)" in logged and f"removed {stale[1]} (0.0 MB)" in logged
    assert not any(p.name in logged for p in kept)


def test_an_export_of_a_directory_being_exported_fails_fast_naming_the_lock(tmp_path, monkeypatch):
    import pipeline.export as export
    from pipeline.runs import RunNotFoundError

    exp = tmp_path / "exp"
    exp.mkdir()
    out = exp / "art"
    live = _stale(exp, ".art.tmp-live0001")  # the running export's work directory
    holder = _held(HOLDER, out)
    try:
        monkeypatch.setattr(export, "ARTIFACT_LOCK_TIMEOUT_S", 0.3)
        start = time.monotonic()
        with pytest.raises(export.ExportError) as err:
            export.write_artifact(tmp_path / "no-run", out)
        assert time.monotonic() - start < 5
        message = str(err.value)
        assert "another export of this artifact directory is running" in message
        assert f"pid {holder.pid} on " in message and str(exp / ".art.lock") in message
        assert "still after 0.3 s" in message
        assert live.is_dir()  # not an orphan: its export holds the lock
        with pytest.raises(export.ExportError, match="another export"):  # registration too
            export.register_artifact(out)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    assert _names(exp) == [".art.tmp-live0001"]  # the lock file went with its holder

    # A holder killed with SIGKILL: the kernel frees the lock; its file stays until the next
    # export, which takes the lock and removes the killed export's temporaries and the file.
    holder = _held(HOLDER, out)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=30)
    assert (exp / ".art.lock").is_file()
    with pytest.raises(RunNotFoundError):
        export.write_artifact(tmp_path / "no-run", out)
    assert _names(exp) == []


def test_the_lock_excludes_a_second_holder_and_is_optional_where_it_cannot_be_made(tmp_path):
    from pipeline.export import ExportError, artifact_lock

    out = tmp_path / "art"
    with artifact_lock(out):
        assert (tmp_path / ".art.lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ExportError, match="another export"), artifact_lock(out, timeout=0):
            pass
    assert _names(tmp_path) == []
    with artifact_lock(out, timeout=0):  # free again
        pass
    # Registration of a directory the lock cannot be made beside: goes on without it.
    with artifact_lock(tmp_path / "missing" / "art", optional=True):
        pass
    missing = tmp_path / "missing" / "art"
    with (
        pytest.raises(ExportError, match="cannot create the export's lock file"),
        artifact_lock(missing),
    ):
        pass
    with pytest.raises(ExportError, match="ends in its name"), artifact_lock(Path(".")):
        pass


def test_a_file_system_without_locks_exports_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    from pipeline.export import artifact_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with artifact_lock(tmp_path / "art"):
        pass
    assert _names(tmp_path) == []


def test_bentoml_temporaries_of_killed_registrations_are_removed_and_nothing_else(tmp_path):
    from pipeline.export import remove_stale_bentoml_temporaries

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    outside = _stale(tmp_path, "outside")

    def marker(temp: str) -> Path:
        path = tmp / f".polytask-register-{temp}.lock"
        path.touch()
        return path

    orphan = _stale(tmp, "bentoml-model-polytask-x-abcd1234", size=1_000_000)
    marker(orphan.name)
    gone = marker("bentoml-model-polytask-x-gone0000")  # its directory was already removed
    unmarked = _stale(tmp, "bentoml-model-polytask-z-ijkl9012")  # another process's, maybe
    other = _stale(tmp, "important")
    marker(other.name)  # not a BentoML directory: never removed
    (tmp / "bentoml-model-polytask-l-link0000").symlink_to(outside, target_is_directory=True)
    marker("bentoml-model-polytask-l-link0000")  # a link: never followed nor removed

    # A live registration: its marker is held by the process that made it.
    live = _stale(tmp, "bentoml-model-polytask-y-efgh5678")
    holder = _held(MARKER_HOLDER, live)
    try:
        assert (tmp / f".polytask-register-{live.name}.lock").is_file()
        assert remove_stale_bentoml_temporaries(tmp) == [orphan]
        assert not orphan.exists() and not gone.exists()
        assert not (tmp / f".polytask-register-{orphan.name}.lock").exists()
        assert live.is_dir() and unmarked.is_dir() and other.is_dir()
        assert (outside / "model.onnx").is_file()
        assert (tmp / "bentoml-model-polytask-l-link0000").is_symlink()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed during BentoML's copy into the store
        holder.communicate(timeout=30)
    assert remove_stale_bentoml_temporaries(tmp) == [live]
    assert sorted(p.name for p in tmp.iterdir() if "-l-" not in p.name) == [
        ".polytask-register-important.lock",
        "bentoml-model-polytask-z-ijkl9012",
        "important",
    ]
