"""Each server keeps its own Prometheus multiprocess files (session 24 review, HIGH: replicas
sharing the model store wiped each other's metrics, since BentoML keeps them under
BENTOML_HOME and empties that directory whenever a server starts)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from test_serving_http import MODEL_NAME, _metrics, _sum, running, store  # noqa: F401  (store: a fixture)

from serving.metrics import PRIVATE_DIR_PREFIX, remove_dead_multiproc_dirs


def test_dirs_of_dead_servers_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    gone = tmp_path / f"{PRIVATE_DIR_PREFIX}{dead_pid}"
    live = tmp_path / f"{PRIVATE_DIR_PREFIX}{os.getpid()}"
    other = tmp_path / f"{PRIVATE_DIR_PREFIX}{dead_pid}x"
    for d in (gone, live, other):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")
    link = tmp_path / f"{PRIVATE_DIR_PREFIX}1234567"
    link.symlink_to(live)
    assert remove_dead_multiproc_dirs(tmp_path) == [gone]
    assert not gone.exists() and live.is_dir() and other.is_dir() and link.is_symlink()


def _collect(directory) -> dict[str, float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {
        s.labels["version"]: s.value
        for family in registry.collect()
        if family.name == "polytask_model_active"
        for s in family.samples
    }


def test_a_worker_exports_only_the_version_it_serves(tmp_path, monkeypatch):
    # Review s24, jobs 16: a multiprocess gauge cannot drop a label set, so each version a
    # worker had served stayed as a 0 series, one more per promotion.
    # prometheus_client is imported before the variable is set: it picks its storage for the
    # whole process at its first import.
    import shutil

    import prometheus_client.multiprocess  # noqa: F401

    from serving.metrics import ActiveVersion

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    # A worker that dies without clean-up (os._exit runs no atexit, as SIGKILL).
    code = (
        "import os\n"
        "from serving.metrics import ActiveVersion\n"
        "ActiveVersion().set('v-old')\n"
        "print(os.getpid(), flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    dead = tmp_path / f"gauge_livemax_{int(out)}-active.db"
    live = tmp_path / "gauge_livemax_1-active.db"  # pid 1 always runs: another live worker
    shutil.copyfile(dead, live)
    assert _collect(tmp_path) == {"v-old": 1.0}

    active = ActiveVersion()
    for n in range(50):
        active.set(f"v{n}")
    assert _collect(tmp_path) == {"v49": 1.0, "v-old": 1.0}  # no v0..v48 at 0
    assert not dead.exists() and live.exists()
    mine = f"gauge_livemax_{os.getpid()}-active.db"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine])


def test_the_supervisor_chooses_its_own_dir_and_a_worker_keeps_its_own():
    code = (
        "import os, serving.service\n"
        "from bentoml._internal.configuration.containers import BentoMLContainer as B\n"
        "print(os.getpid(), B.prometheus_multiproc_dir.get())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1].endswith(f"/{PRIVATE_DIR_PREFIX}{out[0]}")
    assert "BENTOML_HOME" not in out[1] and "prometheus_multiproc_dir" not in out[1]
    worker = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PROMETHEUS_MULTIPROC_DIR": "/somewhere"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert worker[1].endswith("prometheus_multiproc_dir")  # BentoML's own default: untouched


@pytest.mark.integration
def test_a_second_server_on_one_store_leaves_the_first_ones_metrics_alone(store, tmp_path):  # noqa: F811
    home, _, _ = store
    env = {
        "BENTOML_HOME": str(home),
        "POLYTASK_MODEL_NAME": MODEL_NAME,
        "POLYTASK_MODEL": "",
        "POLYTASK_ORT_THREADS": "1",
    }
    command = [sys.executable, "-m", "pipeline.cli", "serve"]
    body = {"texts": ["a fine film", "a dull one", "rain all day"]}

    def answered(url: str) -> float:
        return _sum(_metrics(url), "polytask_predictions_total", task="sentiment")

    with running(command, env, tmp_path / "a.log") as a:
        for _ in range(3):
            assert httpx.post(f"{a}/predict", json=body, timeout=30).status_code == 200
        assert answered(a) == 9
        with running(command, env, tmp_path / "b.log") as b:
            assert answered(a) == 9  # before: 0, B's start emptied the shared directory
            assert httpx.post(f"{a}/predict", json=body, timeout=30).status_code == 200
            assert httpx.post(f"{b}/predict", json={"texts": ["ok"]}, timeout=30).status_code == 200
            assert answered(a) == 12  # before: B's 1
            assert answered(b) == 1
