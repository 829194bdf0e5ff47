"""Integration tier: an experiment suite on a real local Ray cluster, runs side by side."""

from __future__ import annotations

import pytest
from conftest import tiny_config_dict

from pipeline.config import parse_config, resolve_paths
from pipeline.experiments.suite import run_experiment

pytestmark = pytest.mark.integration


def test_ray_suite_runs_in_parallel_and_matches_the_in_process_results(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    import ray

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    raw["train"]["epochs"] = 3
    base = resolve_paths(parse_config(raw), base=tmp_path)
    ray.init(num_cpus=2, logging_level="WARNING")
    try:
        lines: list[str] = []
        on_ray = run_experiment(
            base, "transfer", 1, output=tmp_path / "ray", executor="ray", write=lines.append
        )
    finally:
        ray.shutdown()
    in_process = run_experiment(
        base, "transfer", 1, output=tmp_path / "local", executor="local", write=lambda _: None
    )
    assert not on_ray.failed and not in_process.failed
    assert any("up to 2 at a time" in line for line in lines)
    done = [line for line in lines if line.startswith("[")]
    assert len(done) == 8 and done[-1].startswith("[8/8]") and "ETA" in done[-1]

    import json

    ray_runs = json.loads((on_ray.suite_dir / "results.json").read_text())["runs"]
    local_runs = json.loads((in_process.suite_dir / "results.json").read_text())["runs"]
    # Two runs were training at the same moment: runs, not workers, share the cluster.
    spans = sorted((r["started_at"], r["finished_at"]) for r in ray_runs.values())
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    # Same seeds, same single-worker training: a Ray task computes what this process computes.
    assert {n: r["dev"] for n, r in ray_runs.items()} == {
        n: r["dev"] for n, r in local_runs.items()
    }
    assert on_ray.analysis == in_process.analysis


def test_ray_suite_starts_each_distilled_run_after_its_teachers(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    """On a cluster with room for two runs, the distilled run waits for its teachers (the
    single-task runs of its seed) instead of starting beside them and failing to load them
    (the order among runs ready to start: tests/test_experiments.py, `startable`)."""
    import json

    import ray

    from pipeline.experiments.options import ExperimentOptions

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    raw["train"]["epochs"] = 3
    base = resolve_paths(parse_config(raw), base=tmp_path)
    ray.init(num_cpus=2, logging_level="WARNING")
    try:
        result = run_experiment(
            base,
            "transfer",
            2,
            ExperimentOptions(variants=("distil",)),
            output=tmp_path / "ray",
            executor="ray",
            write=lambda _: None,
        )
    finally:
        ray.shutdown()
    assert not result.failed
    runs = json.loads((result.suite_dir / "results.json").read_text())["runs"]
    for seed in (0, 1):
        teachers = [runs[f"single-{t}-s{seed}"] for t in ("sentiment", "topic")]
        assert runs[f"distil-s{seed}"]["started_at"] >= max(r["finished_at"] for r in teachers)
