"""What every suite shares: run specifications, statistics and report formatting."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RunConfig, config_to_dict, parse_config, select_tasks

# The training settings that define the comparison's baseline ("plain MTL"): hard parameter
# sharing with the config's shared module and towers, equal task weights, no self-auxiliary
# towers, no covariance alignment, every task answered through the shared path (no routing).
# Each method is then switched on alone, and all together.
PLAIN = {
    "aux.enabled": False,
    "alignment.enabled": False,
    "weighting.method": "none",
    "routing.enabled": False,
}


@dataclass
class RunSpec:
    """One training run of a suite: the base config plus `overrides`, on `tasks`.

    Attributes:
        name: Unique within the suite; also the run directory's name.
        variant: What the run measures, e.g. "single", "mtl", "align", "mtl@50".
        seed: train.seed of the run.
        tasks: The tasks trained together (one for a single-task model).
        overrides: Dotted config keys to set, e.g. {"shared.capacity": 50}.
        data_dirs: Task -> replacement data directory, relative to the suite directory (the
            noise suite's corrupted copies).
        params: Suite-specific values the analysis groups by, e.g. {"capacity": 50}.
        measure_alignment: Also score the covariance similarity of the run's tasks before and
            after its alignment R_i (the affinity suite).
        teachers: Task -> the name of a run of this suite that teaches it (`distill.teachers`,
            that run's directory); the run starts only after its teachers finished.
    """

    name: str
    variant: str
    seed: int
    tasks: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    data_dirs: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    measure_alignment: bool = False
    teachers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAX_SEEDS = 100  # a suite's runs are (tasks + variants) x seeds; 100 seeds is already days


def seeds_from(base: RunConfig, n: int) -> list[int]:
    """`n` consecutive seeds starting at the config's train.seed (at most MAX_SEEDS)."""
    if n < 1:
        raise ValueError(f"--seeds must be at least 1, got {n}")
    if n > MAX_SEEDS:
        raise ValueError(f"--seeds must be at most {MAX_SEEDS}, got {n}")
    return [base.train.seed + i for i in range(n)]


def build_config(base: RunConfig, spec: RunSpec, suite_dir: Path) -> RunConfig:
    """The run config of `spec`: one Ray Train local-mode worker per run (runs, not workers,
    are spread over the cluster), its seed, its tasks and overrides, stored under
    `<suite_dir>/runs`; `spec.data_dirs` are taken relative to `suite_dir`.

    Raises:
        ConfigError: an override is not a valid config value (names the key).
    """
    raw = config_to_dict(base)
    for key, value in spec.overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    raw["train"]["seed"] = spec.seed
    raw["scaling"]["num_workers"] = 0
    raw["storage_path"] = str(suite_dir / "runs")
    if spec.teachers:
        raw["distill"]["teachers"] = {
            t: str(suite_dir / "runs" / n) for t, n in spec.teachers.items()
        }
    for task in raw["tasks"]:
        if task["name"] in spec.data_dirs:
            task.update(
                data_dir=str(suite_dir / spec.data_dirs[task["name"]]),
                train=None,
                dev=None,
                format="jsonl",
                text_field="text",
                label_field="label",
            )
    config = parse_config(raw, f"experiment run {spec.name}")
    if spec.tasks != config.task_names:
        config = select_tasks(config, spec.tasks)
    return config


# ------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of a metric over seeds."""

    mean: float
    std: float
    n: int

    def to_json(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Stat:
        return cls(d["mean"], d["std"], d["n"])

    def fmt(self, digits: int = 2, signed: bool = False) -> str:
        if self.n == 0:
            return "-"
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        return text + (f" ± {self.std:.{digits}f}" if self.n > 1 else "")


def stat(values: Iterable[float | None]) -> Stat:
    """Mean and std of the values that exist (failed runs give None)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return Stat(float("nan"), float("nan"), 0)
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return Stat(float(np.mean(vals)), std, len(vals))


def transfer_verdict(delta: Stat, margin: float) -> str:
    """'gain', 'loss' or 'neutral' for a mean change over seeds: a change counts only when it
    is larger than `margin` points and than its own seed-to-seed standard deviation."""
    if delta.n == 0:
        return "n/a"
    threshold = max(margin, delta.std)
    if delta.mean < -threshold:
        return "loss"
    if delta.mean > threshold:
        return "gain"
    return "neutral"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points or a
    constant input."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 3:
        return float("nan")

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):  # ties share their average rank
            tie = a == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


# ------------------------------------------------------------------------ results and reports
def ok_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {name: r for name, r in results.items() if r.get("status") == "ok"}


def accuracy(result: Mapping[str, Any] | None, task: str, key: str = "final") -> float | None:
    """A run's dev accuracy of `task`: 'final' (the selected model) or 'joint' (stage 1)."""
    if result is None or result.get("status") != "ok":
        return None
    if key == "final":
        return result["dev"][task]
    return result["stages"][task][key]


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the rest right."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def failed_section(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's list of failed runs (empty string when every run finished)."""
    failed = {n: r for n, r in results.items() if r.get("status") != "ok"}
    if not failed:
        return ""
    lines = ["## Failed runs", "", "These runs are missing from every table above:", ""]
    lines += [f"- `{n}`: {r.get('error', 'no result')}" for n, r in sorted(failed.items())]
    return "\n".join(lines) + "\n"


def header_section(title: str, meta: Mapping[str, Any], explain: str) -> str:
    """Title, what the suite asks, and how these numbers were produced."""
    seeds = ", ".join(str(s) for s in meta["seeds"])
    return (
        f"# {title}\n\n{explain}\n\n"
        f"- Command: `{meta['command']}`\n"
        f"- Config: `{meta['config_path']}` (name `{meta['config_name']}`), tasks: "
        f"{', '.join(meta['tasks'])}\n"
        f"- Seeds: {seeds}; {meta['n_runs']} training runs, {meta['n_failed']} failed; "
        f"wall time {format_duration(meta['duration_seconds'])} (first run's start to last "
        "run's end)\n"
        + (
            f"- **Partial report** (`--report-only`): {meta['n_pending']} of the "
            f"{meta['n_runs']} runs are not trained yet; means and deviations are over the "
            "seeds whose runs finished.\n"
            if meta.get("n_pending")
            else ""
        )
        + f"- Code: polytask {meta['polytask_version']}, commit {meta['commit']}\n"
        + machines_line(meta.get("machines") or {})
        + "- Accuracies are dev-set percentages of each run's selected model; ± is the standard "
        "deviation over seeds.\n"
    )


NOT_RECORDED = "not recorded"  # a result written before runs recorded their CPU


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU a run trained on, e.g. "Intel(R) Xeon(R) Processor (AVX-512)".

    Recorded per run because the same run specification gives different numbers on different
    CPUs: onnxruntime and torch pick float kernels by vector width, and fine-tuning amplifies
    the differences (a seed's single-task CR moved 1.06 points between two machines,
    docs/results.md). `cpuinfo`: the text of /proc/cpuinfo (read when None; other systems fall
    back to `platform`).
    """
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    flags = set(fields.get("flags", "").split())
    width = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{name} ({width})" if width else name


def machines(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """CPU model -> the names of the runs that trained on it (runs with a result only)."""
    out: dict[str, list[str]] = {}
    for name, r in sorted(results.items()):
        if r.get("status") == "ok":
            out.setdefault(str(r.get("cpu") or NOT_RECORDED), []).append(name)
    return out


def machines_line(by_cpu: Mapping[str, Sequence[str]]) -> str:
    """The report's machine line; loud when a suite's runs trained on different CPUs."""
    if not by_cpu:
        return ""
    if len(by_cpu) == 1:
        cpu = next(iter(by_cpu))
        if cpu == NOT_RECORDED:  # every result predates the record: say nothing false
            return "- Machine: not recorded (these runs' results predate it)\n"
        return f"- Machine: every run on one CPU model ({cpu})\n"
    parts = ", ".join(
        f"{cpu}: {len(names)} run{'s' if len(names) != 1 else ''}"
        for cpu, names in sorted(by_cpu.items(), key=lambda kv: -len(kv[1]))
    )
    return (
        f"- **Machines: the runs trained on {len(by_cpu)} CPU models** ({parts}; which runs: "
        "`results.json`, `meta.machines`). The same run gives somewhat different numbers on "
        "another CPU, so a seed whose runs trained on different CPUs carries that difference "
        "too.\n"
    )


def format_duration(seconds: float) -> str:
    """12m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def overlap_note(results: Mapping[str, Mapping[str, Any]], decontaminated: bool) -> str:
    """Warn when dev sentences of one task are training sentences of another: joint training
    then sees some dev answers, which inflates multi-task scores over single-task ones."""
    pairs: dict[tuple[str, str], float] = {}
    for r in ok_results(results).values():
        for o in r.get("data_overlap", []):
            if o["share"] >= 0.01:
                pairs[(o["dev_task"], o["train_task"])] = o["share"]
    if not pairs:
        return ""
    listed = "; ".join(
        f"{100 * share:.0f}% of {d} dev texts are in {t}'s training data"
        for (d, t), share in sorted(pairs.items())
    )
    if decontaminated:
        return (
            f"**Data overlap** (measured before decontamination): {listed}. This run used "
            "`decontaminate: true`, so those training rows were dropped and the comparison "
            "measures transfer alone.\n"
        )
    return (
        f"**Data overlap, read before the tables**: {listed}. Joint training sees these dev "
        "answers as training rows of another task, so multi-task gains on these tasks are "
        "partly leakage, not transfer. Rerun with `--set decontaminate=true` to measure "
        "transfer alone.\n"
    )


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
