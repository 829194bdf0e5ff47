"""bench/ab_runtime.py: the interleaved A/B counts every text its callers sent, alternates the
two artifacts and reports the ratio of their medians (with fake runtimes: no model needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import load_repo_script


def load_script():
    return load_repo_script("bench/ab_runtime.py")


class FakeRuntime:
    """Runtime.run that takes `delay` seconds per call, and records what it was given."""

    instances: dict[str, list[FakeRuntime]] = {}

    def __init__(self, artifact_dir) -> None:
        self.delay = 0.002 if Path(artifact_dir).name == "slow" else 0.001
        self.texts = 0
        FakeRuntime.instances.setdefault(Path(artifact_dir).name, []).append(self)

    def run(self, texts: list[str]) -> None:
        time.sleep(self.delay)
        self.texts += len(texts)


def test_throughput_counts_every_text_sent():
    ab = load_script()
    fake = FakeRuntime("fast")
    FakeRuntime.instances.clear()
    calls = [["a"] * 32, ["b"] * 5]
    start = time.monotonic()
    rate = ab.throughput(fake, calls, seconds=0.3, clients=4)
    elapsed = time.monotonic() - start
    # What the rate counts is what the runtime was given, over the time the callers ran.
    assert fake.texts > 0
    assert rate * elapsed == pytest.approx(fake.texts, rel=0.2)


def test_main_alternates_the_artifacts_and_reports_the_ratio(tmp_path, monkeypatch, capsys):
    import serving.runtime

    ab = load_script()
    data = tmp_path / "data"
    for task in ("t1", "t2"):
        (data / task).mkdir(parents=True)
        rows = [json.dumps({"text": f"{task} text {i}", "label": "x"}) for i in range(40)]
        (data / task / "dev.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(serving.runtime, "Runtime", FakeRuntime)
    FakeRuntime.instances.clear()
    argv = [str(tmp_path / "slow"), str(tmp_path / "fast"), "--rounds", "4", "--seconds", "0.05"]
    assert ab.main([*argv, "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.count("round ") == 4 and "A / B: " in out
    # Each artifact loaded twice (A, B, B, A), and both copies measured.
    assert [len(FakeRuntime.instances[n]) for n in ("slow", "fast")] == [2, 2]
    assert all(r.texts > 0 for copies in FakeRuntime.instances.values() for r in copies)
