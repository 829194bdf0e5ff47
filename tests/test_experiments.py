"""Experiment suites: plans, label corruption, statistics, reports and resume, on tiny data.

The end-to-end tests train real (tiny) runs through the ordinary training driver in this
process (`--in-process`); the Ray executor is tested in test_experiment_ray.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config_dict

from pipeline.cli import main
from pipeline.config import ConfigError, parse_config, resolve_paths
from pipeline.experiments import affinity, capacity, noise, transfer
from pipeline.experiments.common import (
    PLAIN,
    RunSpec,
    Stat,
    build_config,
    cpu_model,
    machines,
    machines_line,
    seeds_from,
    spearman,
    stat,
    transfer_verdict,
)
from pipeline.experiments.options import ExperimentOptions
from pipeline.experiments.runner import (
    ExperimentError,
    Progress,
    parallel_runs,
    run_resources,
    startable,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def six_task_config(tmp_path: Path):
    raw = {
        "name": "six",
        "tasks": [{"name": n} for n in ("mr", "cr", "subj", "mpqa", "sst2", "trec")],
        "scaling": {"num_workers": 2},
    }
    return resolve_paths(parse_config(raw), base=tmp_path)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def experiment(config: Path, suite: str, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        ["experiment", str(config), "--suite", suite, "--in-process", "--output", str(out), *extra]
    )


# ------------------------------------------------------------------------------------ plans
def test_transfer_plan_has_single_task_models_and_every_variant(tmp_path):
    base = six_task_config(tmp_path)
    specs = transfer.plan(base, [0, 1, 2], ExperimentOptions())
    assert len(specs) == 3 * (6 + 6)
    assert len({s.name for s in specs}) == len(specs)
    singles = [s for s in specs if s.variant == "single"]
    assert sorted(len(s.tasks) for s in singles) == [1] * 18
    assert all(s.overrides == PLAIN for s in singles)
    by_variant = {s.variant: s.overrides for s in specs if s.seed == 0}
    assert by_variant["mtl"] == PLAIN
    assert by_variant["align"]["alignment.enabled"] is True
    assert by_variant["align"]["weighting.method"] == "none"
    assert by_variant["svd"]["weighting.method"] == "svd"
    assert by_variant["aux"]["aux.enabled"] is True
    assert by_variant["all"] == {
        "alignment.enabled": True,
        "weighting.method": "svd",
        "aux.enabled": True,
        "routing.enabled": False,
    }
    assert by_variant["routed"] == {"routing.enabled": True}  # the config as given, routed


def test_one_task_config_is_refused_by_suites_that_compare_tasks(tmp_path):
    raw = {"name": "one", "tasks": [{"name": "mr"}]}
    base = resolve_paths(parse_config(raw), base=tmp_path)
    for module in (transfer, noise, affinity):
        with pytest.raises(ValueError, match="task"):
            module.plan(base, [0], ExperimentOptions())
    # A single task still has a capacity curve (no MTL runs).
    specs = capacity.plan(base, [0], ExperimentOptions(capacities=(5, 50)))
    assert [s.variant for s in specs] == ["single", "single"]


def test_capacity_plan_sweeps_every_width_for_mtl_and_each_task(tmp_path):
    base = six_task_config(tmp_path)
    specs = capacity.plan(base, [0], ExperimentOptions(capacities=(5, 50, 500)))
    assert len(specs) == 3 * (1 + 6)
    assert {s.overrides["shared.capacity"] for s in specs} == {5, 50, 500}
    assert all(s.params["capacity"] == s.overrides["shared.capacity"] for s in specs)


def test_noise_plan_corrupts_only_the_noisy_runs(tmp_path):
    base = six_task_config(tmp_path)
    opts = ExperimentOptions(noise_task="cr", noise_fractions=(0.2, 0.5))
    specs = noise.plan(base, [0, 1], opts)
    assert len(specs) == 2 * 3 * 2  # seeds x (clean + 2 fractions) x (equal, svd)
    for s in specs:
        assert s.overrides["weighting.method"] == s.variant
        if s.params["fraction"] == 0:
            assert s.data_dirs == {}
        else:
            assert list(s.data_dirs) == ["cr"]
            assert str(s.seed) in s.data_dirs["cr"]
    with pytest.raises(ValueError, match="--noise-task 'nope'"):
        noise.plan(base, [0], ExperimentOptions(noise_task="nope"))


def test_affinity_plan_trains_every_pair_with_alignment_kept(tmp_path):
    base = six_task_config(tmp_path)
    specs = affinity.plan(base, [0], ExperimentOptions())
    pairs = [s for s in specs if s.variant == "pair"]
    assert len(pairs) == 15
    assert all(s.measure_alignment and len(s.tasks) == 2 for s in pairs)
    assert all(s.overrides["alignment.keep_only_if_better"] is False for s in pairs)


def test_options_and_seeds_are_validated(tmp_path):
    with pytest.raises(ValueError, match="--noise-fractions"):
        ExperimentOptions(noise_fractions=(1.5,))
    with pytest.raises(ValueError, match="--capacities"):
        ExperimentOptions(capacities=(0,))
    with pytest.raises(ValueError, match="--seeds"):
        seeds_from(six_task_config(tmp_path), 0)
    assert seeds_from(six_task_config(tmp_path), 3) == [0, 1, 2]


def test_build_config_applies_the_spec_and_one_local_worker(tmp_path):
    base = six_task_config(tmp_path)
    spec = RunSpec(
        "x", "single", 7, ["cr"], {"shared.capacity": 42}, data_dirs={"cr": "data/cr-noise20-s7"}
    )
    cfg = build_config(base, spec, tmp_path / "suite")
    assert cfg.task_names == ["cr"]
    assert cfg.shared.capacity == 42
    assert cfg.train.seed == 7
    assert cfg.scaling.num_workers == 0
    assert cfg.storage_path == tmp_path / "suite" / "runs"
    assert cfg.tasks[0].data_dir == tmp_path / "suite" / "data" / "cr-noise20-s7"
    assert cfg.tasks[0].format == "jsonl"
    bad = RunSpec("bad-run", "mtl", 0, base.task_names, {"shared.capacity": -1})
    with pytest.raises(ConfigError, match="bad-run"):
        build_config(base, bad, tmp_path / "suite")


# --------------------------------------------------------------------------- label corruption
@pytest.mark.parametrize("classes", [2, 6])
def test_corrupt_labels_changes_exactly_the_fraction_to_wrong_labels(classes):
    labels = np.arange(1000) % classes
    noisy, idx = noise.corrupt_labels(labels, classes, 0.2, seed=3)
    assert len(idx) == 200
    changed = np.flatnonzero(noisy != labels)
    assert changed.tolist() == idx.tolist()  # every chosen row is wrong, no other row changed
    assert noisy.min() >= 0 and noisy.max() < classes
    again, _ = noise.corrupt_labels(labels, classes, 0.2, seed=3)
    other, _ = noise.corrupt_labels(labels, classes, 0.2, seed=4)
    assert np.array_equal(noisy, again)
    assert not np.array_equal(noisy, other)


# -------------------------------------------------------------------------------- statistics
def test_stat_ignores_missing_values_and_uses_sample_std():
    s = stat([1.0, 3.0, None, float("nan")])
    assert (s.mean, s.n) == (2.0, 2)
    assert s.std == pytest.approx(math.sqrt(2))
    assert stat([5.0]).std == 0.0
    assert stat([None]).n == 0
    assert Stat(1.234, 0.5, 3).fmt(signed=True) == "+1.23 ± 0.50"
    assert Stat(1.0, 0.0, 1).fmt() == "1.00"


def test_transfer_verdict_needs_margin_and_seed_spread():
    assert transfer_verdict(Stat(-2.0, 0.5, 3), margin=0.5) == "loss"
    assert transfer_verdict(Stat(-2.0, 3.0, 3), margin=0.5) == "neutral"  # within seed noise
    assert transfer_verdict(Stat(-0.3, 0.0, 3), margin=0.5) == "neutral"  # below margin
    assert transfer_verdict(Stat(1.0, 0.2, 3), margin=0.5) == "gain"
    assert transfer_verdict(Stat(float("nan"), float("nan"), 0), margin=0.5) == "n/a"


INTEL = (
    "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 avx512f\n"
)
AMD = (
    "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2\n\nprocessor\t: 1\n"
)


def test_cpu_model_names_the_cpu_and_its_vector_width():
    assert cpu_model(INTEL) == "Intel(R) Xeon(R) Processor (AVX-512)"
    assert cpu_model(AMD + "model name\t: another\n") == "AMD EPYC 7B13 (AVX2)"  # the first
    assert cpu_model("model name\t: Plain CPU\n") == "Plain CPU"
    assert cpu_model("") != ""  # no /proc/cpuinfo: the platform's own answer, or "unknown"


def test_report_says_when_a_suites_runs_trained_on_different_cpus():
    one = machines({"a": {"status": "ok", "cpu": "X"}, "b": {"status": "failed"}})
    assert one == {"X": ["a"]}
    assert machines_line(one) == "- Machine: every run on one CPU model (X)\n"
    mixed = machines(
        {
            "s0": {"status": "ok", "cpu": "X"},
            "s1": {"status": "ok", "cpu": "X"},
            "old": {"status": "ok"},
        }  # fmt: skip
    )
    assert mixed == {"X": ["s0", "s1"], "not recorded": ["old"]}
    line = machines_line(mixed)
    assert "trained on 2 CPU models** (X: 2 runs, not recorded: 1 run;" in line
    assert machines_line({}) == ""
    assert "not recorded" in machines_line(machines({"old": {"status": "ok"}}))


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take average ranks: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4].
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman([1, 2], [3, 4]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def ok(dev: dict[str, float], weights: dict[str, float] | None = None) -> dict:
    return {
        "status": "ok",
        "dev": dev,
        "dev_macro": sum(dev.values()) / len(dev),
        "stages": {t: {"joint": a, "final": a} for t, a in dev.items()},
        "task_weights": weights or {t: 1.0 for t in dev},
        "data_overlap": [],
        "duration_seconds": 1.0,
    }


def test_transfer_analysis_flags_a_planted_negative_transfer(tmp_path):
    base = resolve_paths(
        parse_config({"name": "two", "tasks": [{"name": "a"}, {"name": "b"}]}), base=tmp_path
    )
    specs = transfer.plan(base, [0, 1, 2], ExperimentOptions())
    results = {}
    for s in specs:
        if s.variant == "single":
            results[s.name] = ok({s.tasks[0]: 80.0 + s.seed * 0.1})
        else:
            # Task a gains 2 points everywhere; b loses 3 points under SVD weights only.
            b_change = -3.0 if s.variant == "svd" else 0.1
            results[s.name] = ok({"a": 82.0 + s.seed * 0.1, "b": 80.0 + s.seed * 0.1 + b_change})
    results.pop("aux-s2")  # a failed run: its seed is left out, not counted as zero
    out = transfer.analyze(specs, results, ExperimentOptions())
    assert out["delta_vs_single"]["mtl"]["a"]["mean"] == pytest.approx(2.0)
    assert out["verdicts"]["mtl"]["a"] == "gain"
    assert out["verdicts"]["svd"]["b"] == "loss"
    assert out["verdicts"]["mtl"]["b"] == "neutral"
    assert [(n["variant"], n["task"]) for n in out["negative_transfer"]] == [("svd", "b")]
    assert out["accuracy"]["aux"]["a"]["n"] == 2
    assert out["accuracy"]["single"]["macro"]["mean"] == pytest.approx(80.1)
    assert out["best_variant"]["b"] in {"mtl", "align", "aux", "all"}


def test_capacity_analysis_finds_the_best_widths_and_the_rule_of_thumb(tmp_path):
    base = resolve_paths(
        parse_config({"name": "two", "tasks": [{"name": "a"}, {"name": "b"}]}), base=tmp_path
    )
    specs = capacity.plan(base, [0], ExperimentOptions(capacities=(5, 50, 500)))
    peak = {"mtl": 50, "a": 50, "b": 500}  # where each curve is highest
    results = {}
    for s in specs:
        r = s.params["capacity"]
        key = "mtl" if s.variant == "mtl" else s.tasks[0]
        acc = 90.0 if r == peak[key] else 80.0
        results[s.name] = ok({t: acc for t in s.tasks})
    out = capacity.analyze(specs, results, ExperimentOptions())
    summary = out["summary"]
    assert summary["best_mtl_capacity"] == 50
    assert summary["best_single_capacity"] == {"a": 50, "b": 500}
    assert summary["sum_best_single_capacities"] == 550
    assert summary["rule_of_thumb_holds"] is True
    assert summary["best_single_macro"] == pytest.approx(90.0)


# ------------------------------------------------------------------------ resources, progress
def test_run_resources_follow_the_gpu_setting(tmp_path):
    base = six_task_config(tmp_path)
    assert run_resources(base.scaling) == {"num_cpus": 1.0, "num_gpus": 0.0}
    gpu = base.scaling.model_copy(update={"use_gpu": True, "cpus_per_worker": 4.0})
    assert run_resources(gpu) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert parallel_runs({"CPU": 2.0}, {"num_cpus": 1.0, "num_gpus": 0.0}) == 2
    assert parallel_runs({"CPU": 16.0, "GPU": 2.0}, {"num_cpus": 4.0, "num_gpus": 1.0}) == 2
    assert parallel_runs({"CPU": 16.0, "GPU": 8.0}, {"num_cpus": 4.0, "num_gpus": 1.0}) == 4
    with pytest.raises(ExperimentError, match="GPU"):
        parallel_runs({"CPU": 8.0}, {"num_cpus": 1.0, "num_gpus": 1.0})
    with pytest.raises(ExperimentError, match="CPU"):
        parallel_runs({"CPU": 2.0}, {"num_cpus": 4.0, "num_gpus": 0.0})


def test_progress_reports_runs_done_and_a_cost_weighted_eta():
    now = [0.0]
    lines: list[str] = []
    progress = Progress(
        {"big": 300.0, "small": 100.0, "done": 50.0},
        done_before=["done"],
        write=lines.append,
        clock=lambda: now[0],
    )
    now[0] = 60.0
    progress.finished("small", {"status": "ok", "dev_macro": 81.5, "duration_seconds": 60})
    # A quarter of the remaining cost took 60 s: three quarters are left, 180 s.
    assert progress.eta_seconds() == pytest.approx(180.0)
    assert lines[-1].startswith("[2/3] small: dev macro 81.50")
    assert "ETA 3m00s" in lines[-1]
    progress.finished("big", {"status": "failed", "error": "boom", "log": "x.log"})
    assert "FAILED: boom" in lines[-1] and "ETA 0m00s" in lines[-1]


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def tiny_config(tmp_path, tiny_data_dir, tiny_encoder_dir) -> Path:
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    cfg["train"]["epochs"] = 3
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_results(suite_dir: Path) -> dict:
    text = (suite_dir / "results.json").read_text()
    assert "NaN" not in text  # strict JSON: missing statistics are null
    return json.loads(text)


# The plot of two tasks is narrow: a title or legend wider than it collapsed its axes.
@pytest.mark.filterwarnings("error:constrained_layout not applied")
def test_transfer_suite_end_to_end_reports_the_runs_own_numbers(tiny_config, tmp_path):
    out = tmp_path / "transfer"
    rc, stdout, _ = experiment(tiny_config, "transfer", out, "--seeds", "2")
    assert rc == 0, stdout
    assert "[16/16]" in stdout and "ETA" in stdout
    assert "report: " in stdout and "Plain MTL against single-task models" in stdout
    numbers = read_results(out)
    assert numbers["meta"]["n_runs"] == 16 and numbers["meta"]["n_failed"] == 0
    assert {r["commit"] for r in numbers["runs"].values()} == {numbers["meta"]["commit"]}
    assert {r["cpu"] for r in numbers["runs"].values()} == {cpu_model()}
    assert numbers["meta"]["machines"] == {cpu_model(): sorted(numbers["runs"])}
    assert (
        f"- Machine: every run on one CPU model ({cpu_model()})" in (out / "report.md").read_text()
    )
    # Every number traces back to a run's own record.
    run = numbers["runs"]["mtl-s1"]
    record = json.loads((Path(run["run_dir"]) / "run.json").read_text())
    assert run["dev"] == {t: v["accuracy"] for t, v in record["dev"].items()}
    assert record["config"]["train"]["seed"] == 1
    assert record["config"]["aux"]["enabled"] is False
    assert numbers["runs"]["all-s0"]["stages"]  # alignment, SVD and aux on together
    single = [numbers["runs"][f"single-sentiment-s{s}"]["dev"]["sentiment"] for s in (0, 1)]
    mtl = [numbers["runs"][f"mtl-s{s}"]["dev"]["sentiment"] for s in (0, 1)]
    expected = np.mean(np.subtract(mtl, single))
    delta = numbers["analysis"]["delta_vs_single"]["mtl"]["sentiment"]["mean"]
    assert delta == pytest.approx(expected)
    report = (out / "report.md").read_text()
    for label in ("single-task", "plain MTL", "+ alignment", "+ SVD weights", "+ aux towers"):
        assert label in report
    assert f"{delta:+.2f}" in report
    assert (out / "transfer_delta.png").read_bytes().startswith(PNG_MAGIC)
    assert len(list((out / "logs").glob("*.log"))) == 16


def test_suite_rerun_reproduces_its_numbers(tiny_config, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert experiment(tiny_config, "transfer", a, "--seeds", "1")[0] == 0
    assert experiment(tiny_config, "transfer", b, "--seeds", "1")[0] == 0
    ra, rb = read_results(a)["runs"], read_results(b)["runs"]
    assert {n: r["dev"] for n, r in ra.items()} == {n: r["dev"] for n, r in rb.items()}


def test_resume_trains_only_missing_runs_and_refuses_a_changed_plan(tiny_config, tmp_path):
    out = tmp_path / "suite"
    assert experiment(tiny_config, "transfer", out, "--seeds", "1")[0] == 0
    before = read_results(out)
    (out / "results" / "svd-s0.json").unlink()
    rc, stdout, _ = run_cli(
        ["experiment", str(tiny_config), "--suite", "transfer", "--seeds", "1", "--in-process",
         "--resume", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert "resuming: 7 of 8 runs already finished" in stdout
    assert stdout.count("] svd-s0:") == 1 and "] mtl-s0:" not in stdout
    after = read_results(out)
    assert after["analysis"] == before["analysis"]
    rc, _, err = run_cli(
        ["experiment", str(tiny_config), "--suite", "transfer", "--seeds", "2", "--in-process",
         "--resume", str(out)]
    )  # fmt: skip
    assert rc == 2 and "differs" in err
    rc, _, err = experiment(tiny_config, "transfer", out, "--seeds", "1")
    assert rc == 2 and "not empty" in err and "--resume" in err


def test_a_failed_run_is_reported_and_the_suite_goes_on(tiny_config, tmp_path, monkeypatch):
    import pipeline.train.driver as driver

    real_train = driver.train

    def flaky(config, run_name=None):
        if run_name == "align-s0":
            raise RuntimeError("planted failure")
        return real_train(config, run_name=run_name)

    monkeypatch.setattr(driver, "train", flaky)
    out = tmp_path / "suite"
    rc, stdout, err = experiment(tiny_config, "transfer", out, "--seeds", "1")
    assert rc == 1
    assert "align-s0: FAILED: RuntimeError: planted failure" in stdout
    assert "1 run(s) failed: align-s0" in err and "--resume" in err
    report = (out / "report.md").read_text()
    assert "## Failed runs" in report and "planted failure" in report
    assert "planted failure" in (out / "logs" / "align-s0.log").read_text()
    numbers = read_results(out)
    assert numbers["analysis"]["accuracy"]["align"]["sentiment"]["n"] == 0
    assert numbers["analysis"]["accuracy"]["mtl"]["sentiment"]["n"] == 1


def test_noise_suite_trains_on_a_corrupted_copy(tiny_config, tmp_path, tiny_data_dir):
    out = tmp_path / "noise"
    rc, stdout, _ = experiment(
        tiny_config, "noise", out, "--seeds", "1", "--noise-task", "topic",
        "--noise-fractions", "0.25",
    )  # fmt: skip
    assert rc == 0, stdout
    copy = out / "data" / "topic-noise25-s0"
    original = [json.loads(x) for x in (tiny_data_dir / "topic" / "train.jsonl").open()]
    corrupted = [json.loads(x) for x in (copy / "train.jsonl").open()]
    assert [r["text"] for r in corrupted] == [r["text"] for r in original]
    wrong = [
        i
        for i, (a, b) in enumerate(zip(original, corrupted, strict=True))
        if a["label"] != b["label"]
    ]
    assert len(wrong) == round(0.25 * len(original))
    assert json.loads((copy / "corruption.json").read_text())["changed_rows"] == wrong
    assert (copy / "dev.jsonl").read_text().count("\n") == 24
    numbers = read_results(out)
    record = json.loads(
        (Path(numbers["runs"]["noise25-svd-s0"]["run_dir"]) / "run.json").read_text()
    )
    assert record["config"]["weighting"]["method"] == "svd"
    topic = next(t for t in record["config"]["tasks"] if t["name"] == "topic")
    assert topic["data_dir"] == str(copy)
    rows = numbers["analysis"]["rows"]
    assert set(rows) == {"0.0", "0.25"}
    assert rows["0.0"]["none"]["weight_ratio"]["mean"] == pytest.approx(1.0)  # equal weights
    assert "topic" in (out / "report.md").read_text()
    assert (out / "noise.png").read_bytes().startswith(PNG_MAGIC)


def test_capacity_and_affinity_suites_write_their_reports(tiny_config, tmp_path):
    out = tmp_path / "capacity"
    rc, stdout, _ = experiment(tiny_config, "capacity", out, "--seeds", "1", "--capacities", "4,16")
    assert rc == 0, stdout
    report = (out / "report.md").read_text()
    assert "Best multi-task capacity: r = " in report and "Rule of thumb" in report
    for png in ("capacity_macro.png", "capacity_per_task.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    caps = {name.split("-")[-2] for name in read_results(out)["runs"]}
    assert caps == {"r4", "r16"}

    out = tmp_path / "affinity"
    rc, stdout, _ = experiment(tiny_config, "affinity", out, "--seeds", "1")
    assert rc == 0, stdout
    numbers = read_results(out)
    pair = numbers["runs"]["pair-sentiment-topic-s0"]
    sim = pair["similarity"]
    assert sim["tasks"] == ["sentiment", "topic"]
    assert 0.0 <= sim["before"][0][1] <= 1.0 and 0.0 <= sim["after"][0][1] <= 1.0
    entry = numbers["analysis"]["pairs"][0]
    single = numbers["runs"]["single-topic-s0"]["dev"]["topic"]
    assert entry["gain_b"]["mean"] == pytest.approx(pair["stages"]["topic"]["joint"] - single)
    singles = {t: numbers["runs"][f"single-{t}-s0"]["dev"][t] for t in ("sentiment", "topic")}
    aligned = np.mean([pair["stages"][t]["align_best"] - singles[t] for t in singles])
    assert entry["aligned_transfer"]["mean"] == pytest.approx(aligned)
    enc = numbers["analysis"]["encoder_similarity"]
    assert enc["tasks"] == ["sentiment", "topic"]
    assert entry["encoder"]["mean"] == enc["matrix"][0][1] == enc["matrix"][1][0]
    pngs = ("similarity_encoder.png", "similarity_before.png", "similarity_after.png")
    for png in (*pngs, "pair_gain.png", "similarity_vs_transfer.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)


def test_bad_suite_arguments_give_clear_errors(tiny_config, tmp_path):
    rc, _, err = experiment(tiny_config, "capacity", tmp_path / "x", "--capacities", "5,abc")
    assert rc == 2 and "--capacities" in err
    rc, _, err = experiment(tiny_config, "noise", tmp_path / "y", "--noise-task", "nope")
    assert rc == 2 and "--noise-task 'nope'" in err
    rc, _, err = run_cli(
        ["experiment", str(tiny_config), "--suite", "transfer", "--resume", str(tmp_path)]
    )
    assert rc == 2 and "plan.json" in err
    with pytest.raises(SystemExit):
        run_cli(["experiment", str(tiny_config), "--suite", "bogus"])


def test_wall_time_spans_every_run_across_resumed_invocations():
    from pipeline.experiments.suite import wall_seconds

    runs = {
        "a": {"started_at": 100.0, "finished_at": 160.0},
        "b": {"started_at": 1000.0, "finished_at": 1090.5},  # trained by a later --resume
    }
    assert wall_seconds(runs, this_call=5.0) == 990.5
    runs["c"] = {"status": "failed"}  # no timestamps: fall back to this invocation's time
    assert wall_seconds(runs, this_call=5.0) == 5.0


def test_features_are_encoded_once_before_the_runs(tiny_config, tmp_path):
    rc, stdout, _ = experiment(tiny_config, "transfer", tmp_path / "a", "--seeds", "1")
    assert rc == 0
    assert "encoding 4 split(s) once for all runs" in stdout  # 2 tasks x {train, dev}
    for log in (tmp_path / "a" / "logs").glob("*.log"):
        text = log.read_text()
        assert "cached features" in text and "texts/s" not in text, log.name
    rc, stdout, _ = experiment(tiny_config, "noise", tmp_path / "b", "--seeds", "1")
    assert rc == 0 and "encoding" not in stdout  # corrupted copies: same texts, cache hits


def test_distil_variant_is_opt_in_and_taught_by_its_seeds_single_task_runs(tmp_path):
    base = six_task_config(tmp_path)
    assert not any(s.variant == "distil" for s in transfer.plan(base, [0], ExperimentOptions()))
    specs = transfer.plan(base, [0, 1], ExperimentOptions(variants=("routed", "distil")))
    names = [s.name for s in specs]
    for seed in (0, 1):
        spec = next(s for s in specs if s.name == f"distil-s{seed}")
        assert spec.overrides == {"routing.enabled": True}
        assert spec.teachers == {t: f"single-{t}-s{seed}" for t in base.task_names}
        # Planned after its teachers: the runner submits (and the local executor trains) in
        # plan order.
        assert all(names.index(n) < names.index(spec.name) for n in spec.teachers.values())
        config = build_config(base, spec, tmp_path / "suite")
        assert (
            config.distill.teachers["subj"] == tmp_path / "suite" / "runs" / f"single-subj-s{seed}"
        )
    assert all(not s.teachers for s in specs if s.variant != "distil")


def test_distil_suite_reports_its_routing_beside_the_routed_run(tiny_config, tmp_path):
    out = tmp_path / "distil"
    rc, stdout, _ = experiment(
        tiny_config, "transfer", out, "--seeds", "1", "--variants", "routed,distil"
    )
    assert rc == 0, stdout
    numbers = read_results(out)
    assert numbers["meta"]["n_failed"] == 0
    run = numbers["runs"]["distil-s0"]
    record = json.loads((Path(run["run_dir"]) / "run.json").read_text())
    teachers = record["config"]["distill"]["teachers"]
    assert teachers == {
        t: numbers["runs"][f"single-{t}-s0"]["run_dir"] for t in ("sentiment", "topic")
    }
    log = (out / "logs" / "distil-s0.log").read_text()
    assert "distill sentiment: teacher" in log and "distill topic: teacher" in log
    analysis = numbers["analysis"]
    assert set(analysis["routing_distil"]["tasks"]) == {"sentiment", "topic"}
    # Same seed and settings as the routed run but the targets: stage 1 learned otherwise.
    routed = json.loads((Path(numbers["runs"]["routed-s0"]["run_dir"]) / "run.json").read_text())
    assert routed["history"][0]["train_loss"] != record["history"][0]["train_loss"]
    report = (out / "report.md").read_text()
    assert "## Routing: single-task vs shared vs routed\n" in report
    assert "## Routing: single-task vs shared vs routed + distilled\n" in report


def test_a_carried_suite_resumes_and_retrains_teachers_whose_runs_are_gone(tiny_config, tmp_path):
    """A suite's plan.json and results/ copied elsewhere (another checkout or machine) resume
    there; a distilled run still to train gets its teachers trained again, since their run
    directories did not travel."""
    import shutil

    first = tmp_path / "first"
    args = ("--seeds", "1", "--variants", "routed,distil")
    assert experiment(tiny_config, "transfer", first, *args)[0] == 0
    carried = tmp_path / "elsewhere" / "suite"
    carried.mkdir(parents=True)
    shutil.copy(first / "plan.json", carried)
    shutil.copytree(first / "results", carried / "results")
    (carried / "results" / "distil-s0.json").unlink()
    # The other checkout stores its runs elsewhere: not a different suite.
    moved = yaml.safe_load(tiny_config.read_text()) | {"storage_path": str(tmp_path / "other")}
    config = tmp_path / "moved.yaml"
    config.write_text(yaml.safe_dump(moved))
    rc, stdout, err = run_cli(
        ["experiment", str(config), "--suite", "transfer", "--in-process", *args,
         "--resume", str(carried)]
    )  # fmt: skip
    assert rc == 0, stdout + err
    assert "training again 2 teacher run(s) whose directories are gone" in stdout
    assert "] routed-s0:" not in stdout  # finished, and teaches nothing: kept
    numbers = read_results(carried)
    assert numbers["meta"]["n_failed"] == 0
    for name in ("single-sentiment-s0", "single-topic-s0", "distil-s0"):
        assert (carried / "runs" / name / "run.json").is_file(), name
    # Same code, same seed: the teachers trained again score what they scored before.
    before = read_results(first)["runs"]
    for name in ("single-sentiment-s0", "single-topic-s0", "distil-s0"):
        assert numbers["runs"][name]["dev"] == before[name]["dev"], name


def test_report_only_reports_the_finished_runs_and_trains_nothing(tiny_config, tmp_path):
    out = tmp_path / "suite"
    assert experiment(tiny_config, "transfer", out, "--seeds", "2", "--variants", "mtl")[0] == 0
    full = read_results(out)
    for name in ("mtl-s1", "single-topic-s1"):
        (out / "results" / f"{name}.json").unlink()
    argv = ["experiment", str(tiny_config), "--suite", "transfer", "--seeds", "2",
            "--variants", "mtl", "--report-only", "--resume", str(out)]  # fmt: skip
    rc, stdout, _ = run_cli(argv)
    assert rc == 0, stdout
    assert "report only: 4 runs finished, 2 not yet" in stdout
    assert not (out / "results" / "mtl-s1.json").exists()  # nothing was trained
    partial = read_results(out)
    assert partial["meta"]["n_pending"] == 2 and partial["meta"]["n_failed"] == 0
    assert set(partial["runs"]) == set(full["runs"]) - {"mtl-s1", "single-topic-s1"}
    # Means over what finished: seed 0 alone where seed 1 is missing.
    acc = partial["analysis"]["accuracy"]
    assert acc["mtl"]["topic"]["n"] == 1
    assert acc["mtl"]["topic"]["mean"] == full["runs"]["mtl-s0"]["dev"]["topic"]
    assert acc["single"]["sentiment"]["n"] == 2
    assert "**Partial report**" in (out / "report.md").read_text()
    rc, _, err = run_cli(argv[:-2])
    assert rc == 2 and "--report-only needs --resume" in err
    rc, _, err = run_cli(["experiment", str(tiny_config), "--suite", "noise", "--report-only",
                          "--resume", str(out)])  # fmt: skip
    assert rc == 2 and "--report-only" in err


def test_routing_analysis_pairs_the_seeds_whose_routed_run_finished():
    # Seed 1's single-task models finished, its routed run did not (a partial suite): the
    # routing comparison must not set seed 0's routed model against both seeds' single-task
    # models, and the report must say it covers one seed of two.
    def routed_run(acc: float) -> dict:
        route = {"path": "private", "shared_accuracy": acc - 1, "private_accuracy": acc,
                 "crossfit_accuracy": acc - 0.5, "private_crossfit_accuracy": acc - 0.5}  # fmt: skip
        return {"status": "ok", "dev": {"a": acc, "b": acc},
                "stages": {"a": {"route": route}, "b": {"route": route}}}  # fmt: skip

    single = {("a", 0): 80.0, ("b", 0): 80.0, ("a", 1): 90.0, ("b", 1): 90.0}
    out = transfer.routing_analysis(["a", "b"], [0, 1], single, [routed_run(80.2), None])
    assert out["seeds"] == [0]
    row = out["tasks"]["a"]
    assert row["seeds"] == 1 and row["private_chosen"] == 1
    assert row["single"]["n"] == 1 and row["single"]["mean"] == 80.0
    assert row["routed_minus_single"] == pytest.approx(0.2)  # not 80.2 - 85.0
    text = "\n".join(transfer.routing_section(out, ["a", "b"], planned=2))
    assert "**Over 1 of 2 seeds**" in text and "1/1" in text
    full = transfer.routing_analysis(
        ["a", "b"], [0, 1], single, [routed_run(80.2), routed_run(90.2)]
    )
    assert full["tasks"]["a"]["seeds"] == 2 and full["tasks"]["a"]["single"]["mean"] == 85.0
    assert "Over " not in "\n".join(transfer.routing_section(full, ["a", "b"], planned=2))
    # No routed run finished yet (a suite's early partial report): nothing is paired, and the
    # table shows no number, not even a NaN difference against the cross-fitted single-task
    # models that did finish.
    cf = dict.fromkeys(single, 79.0)
    none = transfer.routing_analysis(["a", "b"], [0, 1], single, [None, None], cf)
    assert none["seeds"] == [] and none["targets"] == {}
    text = "\n".join(transfer.routing_section(none, ["a", "b"], planned=2))
    assert "**Over 0 of 2 seeds**" in text and "nan" not in text.lower()


def test_routing_sets_crossfitted_routed_against_the_crossfitted_single_task_model():
    # The single-task models' dev numbers are their best epoch on dev (optimistic); their
    # `selection_crossfit` is the same pick made on half of dev. The report compares routed's
    # cross-fit with it per task, beside the issue's own target lines, and only when every
    # seed's single-task record has it.
    route = {"path": "private", "shared_accuracy": 79.0, "private_accuracy": 80.0,
             "crossfit_accuracy": 79.0, "private_crossfit_accuracy": 79.0}  # fmt: skip
    run = {"status": "ok", "dev": {"a": 80.0, "b": 80.0},
           "stages": {"a": {"route": route}, "b": {"route": route}}}  # fmt: skip
    single = dict.fromkeys([("a", 0), ("b", 0), ("a", 1), ("b", 1)], 80.0)
    cf = {("a", 0): 79.0, ("a", 1): 79.5, ("b", 0): 79.8, ("b", 1): 79.8}
    out = transfer.routing_analysis(["a", "b"], [0, 1], single, [run, run], cf)
    a, b = out["tasks"]["a"], out["tasks"]["b"]
    assert a["single_crossfit"]["mean"] == pytest.approx(79.25)
    assert a["crossfit_minus_single_crossfit"] == pytest.approx(-0.25)
    assert b["crossfit_minus_single_crossfit"] == pytest.approx(-0.8)
    alone = out["targets"]["crossfit_vs_single_crossfit"]
    assert alone["worst"] == pytest.approx(-0.8) and alone["worst_met"] is False
    assert alone["mean"] == pytest.approx(-0.525)
    text = "\n".join(transfer.routing_section(out, ["a", "b"], planned=2))
    header = next(line for line in text.splitlines() if line.startswith("| task"))
    assert "single-task, cross-fitted" in header
    assert "cross-fitted − single-task cross-fitted" in header
    assert "worst task -0.80 (≥ −0.5: no)" in text
    # One seed's single-task record without it (written before it existed): no column, no line.
    cf[("b", 1)] = None
    out = transfer.routing_analysis(["a", "b"], [0, 1], single, [run, run], cf)
    assert "crossfit_vs_single_crossfit" not in out["targets"]
    text = "\n".join(transfer.routing_section(out, ["a", "b"], planned=2))
    assert "cross-fitted − single-task cross-fitted" in text  # task a still has it
    b_row = next(line for line in text.splitlines() if line.startswith("| b "))
    assert b_row.split("|")[3].strip() == "-"
    assert "Selection bias removed" not in text


def test_free_slots_go_to_the_first_runs_in_plan_order_whose_teachers_finished(tmp_path):
    base = six_task_config(tmp_path)
    specs = transfer.plan(base, [0, 1], ExperimentOptions(variants=("distil",)))
    names = [s.name for s in specs]
    assert names[6] == "distil-s0" and names[7] == "single-mr-s1"
    remaining = specs[6:]  # seed 0's single-task runs are done or running

    def pick(finished: list[str], room: int) -> list[str]:
        return [s.name for s in startable(remaining, dict.fromkeys(finished), room)]

    seed0 = names[:6]
    # A teacher still training: the next seed's runs take the slots.
    assert pick(seed0[:5], 2) == ["single-mr-s1", "single-cr-s1"]
    # Its teachers done: the distilled run goes first, ahead of every later run.
    assert pick(seed0, 2) == ["distil-s0", "single-mr-s1"]
    assert pick(seed0, 0) == []
