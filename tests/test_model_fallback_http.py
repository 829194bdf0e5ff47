"""A service (re)started while its promoted model is broken, over real HTTP (`bentoml serve` on
loopback, as in test_serving_http.py).

Claims: it serves the previous good promoted version, says so in /readyz's body and in the log,
and counts it on /metrics (`polytask_model_load_failures_total`, `polytask_model_fallback`, the
active version); a later good promotion is swapped in and ends the fallback. With no loadable
model at all it stays unready, and its 503 bodies say why without any filesystem path.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import train_tiny_run, use_bentoml_home
from test_serving import register_copy
from test_serving_http import MODEL_NAME, _metrics, _post, _sum, running

pytestmark = pytest.mark.integration

SERVE = [sys.executable, "-m", "bentoml", "serve", "serving.service:Polytask"]
# An absolute path in a body: '/' after a space, a quote, '(' or the start, then a name.
PATH_RE = re.compile(r"(^|[\s'\"(=])~?/[\w.-]+/")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("fallback-run")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    return export_run(run_dir, register=False, output_dir=tmp / "artifact").artifact_dir


def _env(home: Path) -> dict[str, str]:
    return {
        "BENTOML_HOME": str(home),
        "POLYTASK_MODEL_NAME": MODEL_NAME,
        "POLYTASK_RELOAD_SECONDS": "1",
        "POLYTASK_ORT_THREADS": "1",
        "POLYTASK_MODEL": "",
    }


def _damage(tag: str) -> Path:
    """Truncate the stored model.onnx of `tag` (e.g. a volume that filled up); its path."""
    import bentoml

    path = Path(bentoml.models.get(tag).path) / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _assert_no_paths(body: str, home: Path) -> None:
    assert str(home) not in body and "/tmp/" not in body, body
    assert not PATH_RE.search(body), body


def test_restarted_with_a_broken_promoted_model_serves_the_previous_good_one(artifact, tmp_path):
    from serving.model_store import promote

    home = tmp_path / "bentoml"
    with use_bentoml_home(home):
        first, good, broken = (register_copy(artifact, MODEL_NAME) for _ in range(3))
        for tag in (first, good, broken):
            promote(tag)
        broken_file = _damage(broken)
    log = tmp_path / "serve.log"
    with running(SERVE, _env(home), log) as url:
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.text.startswith(f"ready, on a fallback model: serving {good} because ")
        assert f"the promoted model {broken} is broken: cannot be loaded" in ready.text
        assert "INVALID_PROTOBUF" in ready.text, ready.text
        _assert_no_paths(ready.text, home)

        resp = _post(url, {"texts": ["good film", "pizza"]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model_version"] == good
        tasks = httpx.get(f"{url}/tasks", timeout=10).json()
        assert tasks["model_version"] == good
        assert tasks["fallback"].startswith(f"serving {good} because the promoted model {broken}")
        _assert_no_paths(tasks["fallback"], home)
        metrics = _metrics(url)
        assert _sum(metrics, "polytask_model_load_failures_total") == 1
        assert _sum(metrics, "polytask_model_fallback") == 1
        assert _sum(metrics, "polytask_model_active", version=good) == 1
        assert _sum(metrics, "polytask_model_active", version=broken) == 0
        text = log.read_text()
        assert f"{broken}" in text and str(broken_file.parent) in text  # the log has the path
        assert "fallback: serving" in text

        # A good promotion ends the fallback, without a restart; the broken one is not retried.
        with use_bentoml_home(home):
            promote(first)
        deadline = time.monotonic() + 30
        while _post(url, {"texts": ["good"]}).json().get("model_version") != first:
            assert time.monotonic() < deadline, "the promoted model was not swapped in"
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while _sum(_metrics(url), "polytask_model_fallback") != 0:
            assert time.monotonic() < deadline, "still reported as a fallback"
            time.sleep(0.5)
        metrics = _metrics(url)
        assert _sum(metrics, "polytask_model_load_failures_total") == 1
        assert _sum(metrics, "polytask_model_active", version=first) == 1
        assert httpx.get(f"{url}/readyz", timeout=10).text == "\n"
        assert httpx.get(f"{url}/tasks", timeout=10).json()["fallback"] is None
    assert "Traceback" not in log.read_text()


def test_without_a_loadable_model_503_bodies_say_why_without_paths(artifact, tmp_path):
    home = tmp_path / "bentoml"
    broken_dir = tmp_path / "broken"
    shutil.copytree(artifact, broken_dir)
    (broken_dir / "model.onnx").write_bytes(b"\x08\x07not a model")
    with use_bentoml_home(home):
        broken = register_copy(broken_dir, MODEL_NAME)  # what `promote` refuses; export can't
    with running(SERVE, _env(home), tmp_path / "serve.log", wait_ready=False) as url:
        deadline = time.monotonic() + 60
        while True:  # the Encoder loads in the background; wait until it has tried
            ready = httpx.get(f"{url}/readyz", timeout=10)
            if "is broken" in ready.text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ready.status_code == 503
        assert f"not ready: no model loaded yet: {broken} is broken: cannot be loaded" in ready.text
        assert f"no other version of {MODEL_NAME} loads" in ready.text
        _assert_no_paths(ready.text, home)
        resp = _post(url, {"texts": ["good"]})
        assert resp.status_code == 503 and resp.json()["reason"] == "not_ready"
        assert f"{broken} is broken" in resp.json()["error"]
        _assert_no_paths(resp.text, home)
        tasks = httpx.get(f"{url}/tasks", timeout=10)
        assert tasks.status_code == 503
        _assert_no_paths(tasks.text, home)
        assert _sum(_metrics(url), "polytask_model_load_failures_total") == 1
