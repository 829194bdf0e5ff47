"""`polytask experiment`: plan a suite, train its runs, analyze them, write the report.

The suite directory (default `<storage_path>/experiments/<name>-<suite>-<time>`):

    plan.json       the suite, options, seeds and every run's spec (checked on --resume)
    results/        one JSON per finished run (written as each run ends)
    runs/, logs/    the runs' own directories and logs
    data/           inputs the suite derived (the noise suite's corrupted copies)
    results.json    every number of the report, with the runs' results
    report.md, *.png
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline import __version__
from pipeline.config import RunConfig, check_encoder_max_length, config_to_dict
from pipeline.experiments import affinity, capacity, incremental, noise, transfer
from pipeline.experiments.common import RunSpec, build_config, machines, seeds_from
from pipeline.experiments.options import ExperimentOptions
from pipeline.experiments.runner import (
    Executor,
    ExperimentError,
    load_results,
    run_cost,
    run_specs,
)

Suite = Literal["transfer", "capacity", "noise", "affinity", "incremental"]


class SuiteModule(Protocol):
    """What a suite module provides (a module may also define
    `prepare(base, specs, suite_dir) -> dict | None`, run before the runs, and
    `finish(base, specs, results, suite_dir) -> dict | None`, run after them (the incremental
    suite adds a task to finished runs), whose dicts reach `analyze` as keyword arguments)."""

    def plan(
        self, base: RunConfig, seeds: Sequence[int], opts: ExperimentOptions
    ) -> list[RunSpec]: ...

    def analyze(
        self,
        specs: Sequence[RunSpec],
        results: Mapping[str, Mapping[str, Any]],
        opts: ExperimentOptions,
    ) -> dict[str, Any]: ...

    def write_report(
        self,
        out_dir: Path,
        analysis: Mapping[str, Any],
        meta: Mapping[str, Any],
        results: Mapping[str, Mapping[str, Any]],
    ) -> list[Path]: ...


SUITES: dict[str, SuiteModule] = {
    "transfer": transfer,
    "capacity": capacity,
    "noise": noise,
    "affinity": affinity,
    "incremental": incremental,
}
PLAN_FILE = "plan.json"


@dataclass
class ExperimentResult:
    suite_dir: Path
    analysis: dict[str, Any]
    files: list[Path]
    failed: list[str]


def code_version() -> str:
    """The git commit of this checkout ('-dirty' with uncommitted changes), if it is one."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def suite_directory(base: RunConfig, suite: str, output: Path | None, resume: Path | None) -> Path:
    """Where the suite writes: --resume DIR, --output DIR (must be new or empty), or a new
    timestamped directory under the config's storage path."""
    if resume is not None:
        if not (resume / PLAN_FILE).is_file():
            raise ExperimentError(f"--resume {resume}: no {PLAN_FILE} there; not a suite directory")
        return resume
    if output is not None:
        if output.exists() and not output.is_dir():
            raise ExperimentError(f"--output {output} exists and is not a directory")
        if output.exists() and any(output.iterdir()):
            raise ExperimentError(
                f"--output {output} exists and is not empty; pick a new directory, or continue "
                f"the suite in it with --resume {output}"
            )
        return output
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return base.storage_path / "experiments" / f"{base.name}-{suite}-{stamp}"


PARTIAL_REPORTS = ("transfer", "capacity")  # suites whose analysis takes missing runs
MOVABLE = ("storage_path", "cache_dir")  # config fields a resumed suite may change


_JSON_KINDS = {str: "string", dict: "object", list: "array"}


def read_plan(suite_dir: Path) -> dict[str, Any]:
    """The saved plan.json of a suite.

    Raises:
        ExperimentError: unreadable, not UTF-8, not JSON, or not a plan; names the file.
    """
    path = suite_dir / PLAN_FILE
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ExperimentError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ExperimentError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except (ValueError, RecursionError) as err:
        raise ExperimentError(f"{path}: not valid JSON ({err})") from None
    kinds = {"suite": str, "config": dict, "options": dict, "specs": list}
    if not isinstance(saved, dict):
        raise ExperimentError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    for key, kind in kinds.items():
        if not isinstance(saved.get(key), kind):
            raise ExperimentError(
                f"{path}: {key}: expected a JSON {_JSON_KINDS[kind]}"
                f"{'' if key in saved else ' (missing)'}; not a plan written by polytask"
            )
    if "data" in saved and not isinstance(saved["data"], dict):
        raise ExperimentError(f"{path}: data: expected a JSON object of task fingerprints")
    return saved


def check_plan(suite_dir: Path, plan: dict[str, Any], write: Callable[[str], None] = print) -> bool:
    """On --resume, the new plan must be the saved one: otherwise old and new results mix.
    That includes the data: a task whose files changed since the plan was saved (its
    fingerprint in `data`) is refused. Returns whether the saved plan records the data's
    fingerprints (plans written before they were recorded do not; then changed data cannot
    be detected, and this says so).

    Raises:
        ExperimentError: the saved plan is unreadable or differs; names the file or the task.
    """
    saved = read_plan(suite_dir)

    # Where runs and caches are stored does not change what they measure (a suite's runs live
    # in its own directory): a suite carried to another checkout or machine can resume.
    def view(p: dict[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in p["config"].items() if k not in MOVABLE}
        return p | {"config": config}

    for key in ("suite", "config", "options", "specs"):
        if view(saved).get(key) != view(plan)[key]:
            raise ExperimentError(
                f"--resume {suite_dir}: the saved suite differs in its {key} (a different "
                "config, suite, seeds or option); rerun with the same arguments, or start a new "
                "suite without --resume"
            )
    if "data" not in saved:
        write(
            f"note: {suite_dir / PLAN_FILE} records no data fingerprints (planned before they "
            "were recorded): runs finished before are not checked against changed data"
        )
        return False
    changed = sorted(t for t, fp in plan["data"].items() if saved["data"].get(t) != fp)
    if changed:
        raise ExperimentError(
            f"--resume {suite_dir}: the data of task(s) {', '.join(changed)} changed since the "
            "suite was planned (file fingerprints differ); its finished runs trained on the old "
            "data and would be compared with runs on the new: restore the data, or start a new "
            "suite without --resume"
        )
    return True


def data_fingerprints(base: RunConfig) -> dict[str, str]:
    """Per task, sha256 over its train and dev files' bytes: what `--resume` checks so that
    runs trained on other data are never mixed into one report."""
    from pipeline.data import fingerprint_files

    paths = {
        t.name: [t.split_path(s, base.data_root) for s in ("train", "dev")] for t in base.tasks
    }
    return {name: fingerprint_files([p for p in ps if p.is_file()]) for name, ps in paths.items()}


def run_experiment(
    base: RunConfig,
    suite: Suite,
    seeds: int,
    opts: ExperimentOptions | None = None,
    *,
    config_path: str = "",
    command: str = "",
    output: Path | None = None,
    resume: Path | None = None,
    executor: Executor = "ray",
    address: str | None = None,
    write: Callable[[str], None] = print,
    report_only: bool = False,
) -> ExperimentResult:
    """Plan, train (skipping runs already finished on --resume), analyze and report a suite.
    `report_only`: train nothing; report the runs of `resume` that finished so far.

    Raises:
        ValueError: the suite does not fit the config (e.g. one task, unknown --noise-task).
        ConfigError, DataError, EncoderNotFoundError: bad config, data or encoder, found
            before any training starts.
        ExperimentError: unusable directories, a changed plan on --resume, or a cluster that
            cannot hold one run.
    """
    from pipeline.data import load_tasks
    from pipeline.features import resolve_encoder_path

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    module = SUITES[suite]
    if report_only and resume is None:
        raise ExperimentError("--report-only needs --resume DIR: the suite to report on")
    if report_only and suite not in PARTIAL_REPORTS:
        raise ExperimentError(
            f"--report-only: the {suite} suite needs all its runs to report; it works for "
            f"{', '.join(PARTIAL_REPORTS)}"
        )
    opts = opts or ExperimentOptions()
    seed_list = seeds_from(base, seeds)  # bounded, before anything is planned
    start = time.monotonic()
    commit = code_version()  # the code that trains the runs, not whatever is checked out later
    # Check data and encoder once, before any run starts (and size the runs for the ETA).
    encoder_path = resolve_encoder_path(base.encoder.path, base.encoder.allow_download)
    check_encoder_max_length(base, encoder_path, source="the suite's config")
    n_train = {t.name: len(t.splits["train"]) for t in load_tasks(base, splits=["train"])}
    specs: list[RunSpec] = module.plan(base, seed_list, opts)
    suite_dir = suite_directory(base, suite, output, resume).resolve()
    plan = {
        "suite": suite,
        "config": config_to_dict(base),
        "options": json.loads(json.dumps(opts.to_json())),
        "specs": [s.to_json() for s in specs],
        "data": data_fingerprints(base),
    }
    if resume is not None and not check_plan(suite_dir, plan, write):
        del plan["data"]  # a fingerprint now would not be the one the earlier runs trained on
    configs = {s.name: build_config(base, s, suite_dir) for s in specs}
    suite_dir.mkdir(parents=True, exist_ok=True)
    (suite_dir / PLAN_FILE).write_text(json.dumps(plan | {"seeds": seed_list}, indent=1))
    write(f"{suite} suite: {len(specs)} runs ({len(seed_list)} seed(s)) -> {suite_dir}")
    pending: list[str] = []
    if report_only:
        results = load_results(suite_dir, specs)
        pending = [s.name for s in specs if s.name not in results]
        write(f"report only: {len(specs) - len(pending)} runs finished, {len(pending)} not yet")
        prepared: dict[str, Any] = {}
    else:
        if needs_features(base, specs):
            warm_feature_cache(base, write)
        if base.encoder.fine_tuned:
            warm_token_states(base, write)
        # A suite's own inputs (noise: corrupted copies; affinity: encoder-feature similarity).
        prepare = getattr(module, "prepare", None)
        prepared = (prepare(base, specs, suite_dir) if prepare is not None else None) or {}
        costs = {s.name: run_cost(configs[s.name], n_train) for s in specs}
        address = address or base.scaling.address
        results = run_specs(
            specs, configs, suite_dir, costs, executor, address, write, stamp={"commit": commit}
        )

        finish = getattr(module, "finish", None)
        if finish is not None:
            prepared = prepared | (finish(base, specs, results, suite_dir) or {})
    failed = sorted(n for n, r in results.items() if r.get("status") != "ok")
    analysis = module.analyze(specs, results, opts, **prepared)
    meta = {
        "suite": suite,
        "command": command or f"polytask experiment {config_path} --suite {suite} --seeds {seeds}",
        "config_path": config_path,
        "config_name": base.name,
        "tasks": base.task_names,
        "seeds": seed_list,
        "decontaminate": base.decontaminate,
        "n_runs": len(specs),
        "n_failed": len(failed),
        "n_pending": len(pending),
        "duration_seconds": wall_seconds(results, time.monotonic() - start),
        "train_seconds_total": round(
            sum(r.get("duration_seconds", 0.0) for r in results.values()), 1
        ),
        "polytask_version": __version__,
        "commit": ", ".join(sorted({str(r.get("commit", "unknown")) for r in results.values()})),
        "machines": machines(results),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "executor": executor,
    }
    files = module.write_report(suite_dir, analysis, meta, results)
    numbers = {"meta": meta, "options": opts.to_json(), "analysis": analysis, "runs": results}
    (suite_dir / "results.json").write_text(
        json.dumps(_finite(numbers), indent=1, default=_json_default)
    )
    files.append(suite_dir / "results.json")
    return ExperimentResult(suite_dir, analysis, files, failed)


def needs_features(base: RunConfig, specs: Sequence[RunSpec]) -> bool:
    """Whether the runs read pooled features of the pretrained encoder (frozen encoder, or SVD
    weights in some variant), as the training driver decides per run. Fine-tuned runs take
    their standardization from a sample of cached token states instead."""
    enc = base.encoder
    svd = base.weighting.method == "svd" or any(
        s.overrides.get("weighting.method") == "svd" for s in specs
    )
    return not enc.fine_tuned or svd


def warm_token_states(base: RunConfig, write: Callable[[str], None]) -> None:
    """Fill the token-state cache of fine-tuned runs once, here, before the runs start (for
    the same reasons as `warm_feature_cache`); whole-encoder runs have nothing to cache."""
    from pipeline.data import load_tasks
    from pipeline.features import resolve_encoder_path
    from pipeline.train.driver import prepare_inputs

    enc = base.encoder
    if enc.trainable_layers == "all":
        return
    write(
        f"computing the cached bottom-layer token states once for all runs (top "
        f"{enc.trainable_layers} layer(s) fine-tuned); progress below"
    )
    prepare_inputs(base, load_tasks(base), resolve_encoder_path(enc.path, enc.allow_download))


def warm_feature_cache(base: RunConfig, write: Callable[[str], None]) -> None:
    """Encode every split of every task once, here, before the runs start.

    Otherwise the first runs would each encode their tasks with their progress only in their
    logs, and two runs could encode the same file at once. Every run then reads the cache:
    single-task and multi-task runs, the noise suite's copies (same texts) and decontaminated
    subsets (rows of the whole file). On a multi-node cluster this fills the driver's cache
    only, unless `cache_dir` is shared.
    """
    from pipeline.data import load_tasks
    from pipeline.features import FeatureCache, resolve_encoder_path

    enc = base.encoder
    encoder_path = resolve_encoder_path(enc.path, enc.allow_download)
    cache = FeatureCache(base.resolved_cache_dir(), encoder_path, enc.max_length, enc.pooling)
    tasks = load_tasks(base)
    missing = [
        (t.name, name, split)
        for t in tasks
        for name, split in t.splits.items()
        if not cache.path_for(split.texts).is_file()
    ]
    if not missing:
        return
    write(
        f"encoding {len(missing)} split(s) once for all runs (frozen encoder; cached in "
        f"{cache.dir}); progress below"
    )
    for task, name, split in missing:
        cache.get(split.texts, desc=f"features {task}/{name}", batch_size=enc.batch_size)


def wall_seconds(results: dict[str, dict[str, Any]], this_call: float) -> float:
    """From the first run's start to the last run's end, across --resume invocations; this
    invocation's time when the runs carry no timestamps."""
    starts = [r["started_at"] for r in results.values() if "started_at" in r]
    ends = [r["finished_at"] for r in results.values() if "finished_at" in r]
    if len(starts) != len(results) or not starts:
        return round(this_call, 1)
    return round(max(ends) - min(starts), 1)


def _finite(value: Any) -> Any:
    """NaN (a statistic with no runs behind it) as JSON null, not the non-standard NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def summary_text(report: Path) -> str:
    """The '## Summary' section of a report, for the console."""
    text = report.read_text()
    if "## Summary" not in text:
        return ""
    body = text.split("## Summary", 1)[1]
    return body.split("\n## ", 1)[0].strip()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def parse_list(text: str, kind: type, flag: str) -> tuple[Any, ...]:
    """'5,10,20' -> (5, 10, 20), with an error naming the flag."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"{flag}: expected comma-separated {kind.__name__}s, got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"{flag}: no values given")
    return values
