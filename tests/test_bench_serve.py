"""bench/serve.py leaves nothing in the temporary directory: every scratch directory it makes
(a model store, an int8 graph, an exported artifact: 100+ MB each) goes when `main` returns,
whether it finished or failed."""

from __future__ import annotations

import pytest
from conftest import load_repo_script


def test_scratch_directories_are_removed_on_return_and_on_failure(monkeypatch, tmp_path):
    serve = load_repo_script("bench/serve.py")
    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path))
    made = []

    def fake_main(argv):
        for prefix in ("bench-bentoml-", "bench-int8-"):
            path = serve.scratch(prefix)
            (path / "weights.bin").write_bytes(b"x" * 1024)
            made.append(path)
        if argv == ["fail"]:
            raise SystemExit("server did not start")
        return 0

    monkeypatch.setattr(serve, "_main", fake_main)
    assert serve.main([]) == 0
    assert len(made) == 2 and not any(p.exists() for p in made)

    made.clear()
    with pytest.raises(SystemExit, match="did not start"):
        serve.main(["fail"])
    assert len(made) == 2 and not any(p.exists() for p in made)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_cannot_start_leaves_no_store_behind(monkeypatch, tmp_path):
    """bench/serve.py's Server (also bench/hostile.py's) keeps its model store in a temporary
    directory: gone when registering the artifact fails, with the reason in the message."""
    serve = load_repo_script("bench/serve.py")
    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path))
    server = serve.Server(tmp_path / "no-such-artifact", threads=1)
    with pytest.raises(SystemExit, match="could not register"):
        server.__enter__()
    assert list(tmp_path.iterdir()) == []
