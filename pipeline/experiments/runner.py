"""Run a suite's training runs: each one a Ray task calling the ordinary training driver.

A run is one `pipeline.train.driver.train` call in Ray Train local mode (one worker, in the
task's process). Runs, not workers, are spread over the cluster: a suite's runs are small and
many, so running several side by side uses a cluster far better than splitting each run across
workers. Ray's scheduler starts as many at once as the cluster's free CPUs (GPUs) allow.

Every finished run's summary is written to `<suite dir>/results/<run>.json` at once; a suite
started again on the same directory (`--resume`) trains only the runs that have no result yet.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import RunConfig, ScalingConfig, config_to_dict, parse_config
from pipeline.experiments.common import RunSpec, cpu_model, format_duration

logger = logging.getLogger(__name__)

Executor = Literal["ray", "local"]

# Fixed cost of a run (process start, data loading, evaluation) in training-example
# equivalents, so that the ETA of many small runs is not underestimated.
RUN_OVERHEAD_EXAMPLES = 20_000


class ExperimentError(Exception):
    """An experiment that cannot start or whose directory cannot be used; says why."""


# ------------------------------------------------------------------------------- resources
def run_resources(scaling: ScalingConfig) -> dict[str, float]:
    """Ray resources of one run: the config's CPUs per worker, and one GPU when it trains on
    GPUs (Ray Train local mode then uses the task's GPU)."""
    return {"num_cpus": float(scaling.cpus_per_worker), "num_gpus": 1.0 if scaling.use_gpu else 0.0}


def parallel_runs(cluster: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many runs the cluster can hold at once.

    Raises:
        ExperimentError: not even one run fits.
    """
    fits = []
    for key, ray_key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = resources.get(key, 0.0)
        if need <= 0:
            continue
        have = float(cluster.get(ray_key, 0.0))
        if have + 1e-9 < need:
            raise ExperimentError(
                f"one run needs {need:g} {ray_key} but the Ray cluster has {have:g}; lower "
                "scaling.cpus_per_worker, or set scaling.use_gpu=false on a cluster without GPUs"
            )
        fits.append(int(math.floor(have / need + 1e-9)))
    return max(1, min(fits)) if fits else 1


def run_cost(config: RunConfig, n_train: Mapping[str, int]) -> float:
    """Relative cost of a run, in training examples processed (for the ETA only)."""
    n = sum(n_train[t] for t in config.task_names)
    epochs = config.train.epochs * (1.3 if config.aux.enabled else 1.0)
    if config.alignment.enabled:
        epochs += config.alignment.epochs
    return n * epochs + RUN_OVERHEAD_EXAMPLES


# ------------------------------------------------------------------------------ one run
def execute_run(
    config_dict: dict[str, Any], run_name: str, log_path: str, measure_alignment: bool
) -> dict[str, Any]:
    """Train one run (in a Ray task, or in this process) and summarize it.

    The run's own log lines go to `log_path`, not to the console: a suite trains dozens of runs
    and prints one line per finished run instead.

    Returns:
        {"status": "ok", "dev": {task: accuracy}, "dev_macro", "stages", "task_weights",
        "data_overlap", "duration_seconds", "started_at", "finished_at" (Unix time), "run_dir",
        "node", "cpu" (`cpu_model`), "similarity"} or
        {"status": "failed", "error", "log"}.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pipeline_log = logging.getLogger("pipeline")
    saved = (pipeline_log.handlers[:], pipeline_log.level, pipeline_log.propagate)
    pipeline_log.handlers = [handler]
    pipeline_log.setLevel(logging.INFO)
    pipeline_log.propagate = False
    # Ray Train local mode logs every report at INFO: keep its warnings only. Progress bars
    # of dozens of runs would bury the suite's own progress lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start, started_at = time.monotonic(), time.time()
    try:
        from pipeline.runs import RUN_RECORD
        from pipeline.train.driver import train

        config = parse_config(config_dict, run_name)
        stale = Path(config.storage_path) / run_name
        if stale.is_dir() and not stale.is_symlink():
            # An earlier attempt of this run that left no result (it failed or was
            # interrupted): the run is trained again from scratch, and train() never
            # overwrites a directory. A finished one (its run.json written, its result not:
            # killed in between) is kept aside rather than deleted: it cost a training.
            if (stale / RUN_RECORD).is_file():
                aside = stale.with_name(f"{run_name}.replaced-{int(time.time())}")
                stale.rename(aside)
                logger.warning("%s: a finished run without a result, kept as %s", stale, aside)
            else:
                shutil.rmtree(stale)
        result = train(config, run_name=run_name)
        rec = result.record
        similarity = None
        if measure_alignment:
            from pipeline.affinity import similarity_before_after

            names, before, after, _ = similarity_before_after(config, result.run_dir)
            similarity = {
                "tasks": names,
                "before": before.tolist(),
                "after": None if after is None else after.tolist(),
            }
        return {
            "status": "ok",
            "dev": {t: v["accuracy"] for t, v in rec.dev.items()},
            "dev_macro": rec.dev_macro_accuracy,
            "stages": {t: s.model_dump() for t, s in rec.stages.items()},
            "task_weights": rec.task_weights,
            "data_overlap": (rec.data_overlap or {}).get("pairs", []),
            "duration_seconds": round(time.monotonic() - start, 1),
            "started_at": started_at,
            "finished_at": time.time(),
            "run_dir": str(result.run_dir),
            "node": socket.gethostname(),
            "cpu": cpu_model(),
            "similarity": similarity,
        }
    except Exception as err:  # one failed run must not end the suite; the report lists it
        pipeline_log.error("run %s failed:\n%s", run_name, traceback.format_exc())
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}",
            "log": log_path,
        }
    finally:
        handler.close()
        pipeline_log.handlers, level, pipeline_log.propagate = saved[0], saved[1], saved[2]
        pipeline_log.setLevel(level)


# ------------------------------------------------------------------------------- progress
class Progress:
    """One console line per finished run: runs done, elapsed time and ETA.

    The ETA scales the elapsed time by the remaining share of the suite's estimated cost
    (`run_cost`), so it accounts for runs of different sizes and for parallel execution.
    """

    def __init__(
        self,
        costs: Mapping[str, float],
        done_before: Sequence[str] = (),
        write: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.costs = dict(costs)
        self.total = len(costs)
        self.done = len(done_before)
        self.cost_todo = sum(c for n, c in costs.items() if n not in set(done_before))
        self.cost_done = 0.0
        self.start = clock()
        self.write = write

    def eta_seconds(self) -> float | None:
        if self.cost_done <= 0:
            return None
        elapsed = self.clock() - self.start
        return elapsed * (self.cost_todo - self.cost_done) / self.cost_done

    def finished(self, name: str, result: Mapping[str, Any]) -> None:
        self.done += 1
        self.cost_done += self.costs.get(name, 0.0)
        if result.get("status") == "ok":
            what = f"dev macro {result['dev_macro']:.2f} ({result['duration_seconds']:.0f} s)"
        else:
            what = f"FAILED: {result.get('error')} (log: {result.get('log')})"
        eta = self.eta_seconds()
        self.write(
            f"[{self.done:>{len(str(self.total))}}/{self.total}] {name}: {what} | elapsed "
            f"{format_duration(self.clock() - self.start)}, ETA "
            f"{format_duration(eta) if eta is not None else '?'}"
        )


# ------------------------------------------------------------------------------- the runner
def results_dir(suite_dir: Path) -> Path:
    return suite_dir / "results"


Finite = Annotated[float, Field(allow_inf_nan=False)]


class OkResult(BaseModel):
    """The fields of a finished run's result (`execute_run`) that the suites' analyses read,
    checked when a suite reads its results back (a result file may have been edited, cut
    short or carried from elsewhere). Other fields are kept as they are."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]
    dev: dict[str, Finite]
    dev_macro: Finite
    stages: dict[str, Any]
    task_weights: dict[str, float] = {}
    data_overlap: list[dict[str, Any]] = []
    duration_seconds: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    similarity: dict[str, Any] | None = None


def load_results(suite_dir: Path, specs: Sequence[RunSpec] = ()) -> dict[str, dict[str, Any]]:
    """Results of runs that already finished in `suite_dir` (ok ones only: failed runs are
    tried again). With `specs`, a finished run's result must also cover the run's tasks.

    Raises:
        ExperimentError: a result file that cannot be read, or whose finished run lacks what
            the analysis needs; names the file (delete it to train that run again).
    """
    from pipeline.runs import StageRecord

    tasks = {s.name: s.tasks for s in specs}
    out = {}
    for path in sorted(results_dir(suite_dir).glob("*.json")):

        def bad(problem: str, path: Path = path) -> ExperimentError:
            return ExperimentError(
                f"{path}: {problem}; fix or delete this file (the run {path.stem} is then "
                "trained again)"
            )

        try:
            result = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as err:
            raise bad(f"cannot read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise bad(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
        except (ValueError, RecursionError) as err:
            raise bad(f"not valid JSON ({err})") from None
        if not isinstance(result, dict):
            raise bad(f"expected a JSON object, got {type(result).__name__}")
        if result.get("status") != "ok":
            continue
        checks = [("", OkResult, result)]
        if isinstance(result.get("stages"), dict):
            checks += [(f"stages.{t}.", StageRecord, v) for t, v in result["stages"].items()]
        parsed: list[Any] = []
        for prefix, model, value in checks:
            try:
                parsed.append(model.model_validate(value))
            except ValidationError as err:
                first = err.errors()[0]
                field = prefix + ".".join(str(p) for p in first["loc"])
                raise bad(
                    f"a finished run's result with a bad {field.rstrip('.') or '(top level)'}: "
                    f"{first['msg']}"
                ) from None
        # The checked values, as the analyses expect them (a "50" read as 50.0).
        ok, stages = parsed[0], parsed[1:]
        result = result | ok.model_dump(include=set(OkResult.model_fields))
        result["stages"] = {
            t: st.model_dump() for t, st in zip(result["stages"], stages, strict=True)
        }
        missing = [t for t in tasks.get(path.stem, []) if t not in result["dev"]]
        if missing:
            raise bad(f"a finished run's result without the dev accuracy of {missing}")
        out[path.stem] = result
    return out


def startable(
    remaining: Sequence[RunSpec], finished: Mapping[str, Any], room: int
) -> list[RunSpec]:
    """The first `room` runs of `remaining` (plan order) whose teachers have all `finished`."""
    ready = [s for s in remaining if all(t in finished for t in s.teachers.values())]
    return ready[: max(0, room)]


def run_specs(
    specs: Sequence[RunSpec],
    configs: Mapping[str, RunConfig],
    suite_dir: Path,
    costs: Mapping[str, float],
    executor: Executor = "ray",
    address: str | None = None,
    write: Callable[[str], None] = print,
    stamp: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train every spec not yet finished in `suite_dir`; return every run's result by name.
    `stamp` (e.g. the code's commit) is added to the result of every run trained now.

    Raises:
        ExperimentError: the Ray cluster cannot hold one run.
    """
    results = load_results(suite_dir, specs)
    # A teacher (RunSpec.teachers) that finished but whose run directory is gone (the suite's
    # results carried to another machine) is trained again before the run it teaches.
    needed = {n for s in specs if s.name not in results for n in s.teachers.values()}
    lost = sorted(
        n for n in needed if n in results and not (suite_dir / "runs" / n / "run.json").is_file()
    )
    if lost:
        write(f"training again {len(lost)} teacher run(s) whose directories are gone: {lost}")
        results = {n: r for n, r in results.items() if n not in lost}
    todo = [s for s in specs if s.name not in results]
    if results:
        write(f"resuming: {len(results)} of {len(specs)} runs already finished in {suite_dir}")
    progress = Progress(costs, done_before=list(results), write=write)
    results_dir(suite_dir).mkdir(parents=True, exist_ok=True)

    def record(name: str, result: dict[str, Any]) -> None:
        result = {**result, **(stamp or {})}
        results[name] = result
        tmp = results_dir(suite_dir) / f".{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(results_dir(suite_dir) / f"{name}.json")
        progress.finished(name, result)

    def args(spec: RunSpec) -> tuple[dict[str, Any], str, str, bool]:
        log = str(suite_dir / "logs" / f"{spec.name}.log")
        return config_to_dict(configs[spec.name]), spec.name, log, spec.measure_alignment

    if executor == "local":
        for spec in todo:
            record(spec.name, execute_run(*args(spec)))
        return results
    if not todo:
        return results

    import ray

    from pipeline.train.driver import connect_ray

    connect_ray(address)
    resources = run_resources(next(iter(configs.values())).scaling)
    slots = parallel_runs(ray.cluster_resources(), resources)
    write(
        f"{len(todo)} runs to train, up to {slots} at a time on the Ray cluster "
        f"({resources['num_cpus']:g} CPU{', 1 GPU' if resources['num_gpus'] else ''} each); "
        f"logs in {suite_dir / 'logs'}"
    )
    remote = ray.remote(execute_run).options(
        num_cpus=resources["num_cpus"],
        num_gpus=resources["num_gpus"],
        max_retries=1,
    )
    remaining = list(todo)
    pending: dict[Any, str] = {}

    def submit() -> None:
        """Fill the free slots in plan order with runs whose teachers (RunSpec.teachers) have
        finished. Submitting only what can start keeps the plan's order: Ray would run a task
        whose arguments became ready late after every task queued before that, so a seed's
        distilled run would wait for all later seeds' runs."""
        try:
            room = parallel_runs(ray.cluster_resources(), resources) - len(pending)
        except ExperimentError:  # the cluster lost its nodes: wait while runs are in flight
            if not pending:
                raise
            return
        for spec in startable(remaining, results, room):
            pending[remote.remote(*args(spec))] = spec.name
            remaining.remove(spec)

    submit()
    last_note = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=30)
            if not ready:
                if time.monotonic() - last_note > 120:
                    write(f"... {len(pending) + len(remaining)} runs still queued or running")
                    last_note = time.monotonic()
                continue
            ref = ready[0]
            name = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the task's process died (OOM, node lost, ...)
                result = {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0]}",
                    "log": str(suite_dir / "logs" / f"{name}.log"),
                }
            record(name, result)
            submit()
            last_note = time.monotonic()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        write(
            f"interrupted: {len(results)} runs are saved in {results_dir(suite_dir)}; "
            f"continue with --resume {suite_dir}"
        )
        raise
    for spec in remaining:  # unreachable while every teacher is a run of the plan
        record(spec.name, {"status": "failed", "error": "its teachers never finished"})
    return results
