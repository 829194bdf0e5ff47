"""The `polytask` command: parses arguments and calls the pipeline's functions, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("polytask")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(pairs: Sequence[str]) -> dict[str, object]:
    """`--set train.epochs=3` pairs; values parsed as YAML (numbers, booleans, lists).

    Raises:
        ConfigError: a pair that is not KEY=VALUE, or a value that is not valid YAML (names
            the --set item).
    """
    from pipeline.config import ConfigError, YamlFileError, load_yaml

    out: dict[str, object] = {}
    errors = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            errors.append(f"{pair!r}: expected KEY=VALUE, e.g. train.epochs=3")
            continue
        try:
            out[key] = load_yaml(value)
        except YamlFileError as err:
            errors.append(f"{pair!r}: the value is not valid YAML ({err.problem})")
    if errors:
        raise ConfigError("--set", errors)
    return out


def _run_name(value: str | None) -> str | None:
    """`--run-name`, checked as a plain directory name before any work (RunNameError)."""
    from pipeline.runs import check_run_name

    if value is not None:
        check_run_name(value)
    return value


def _split_name(value: str, flag: str = "--split") -> str:
    """A split is a file name stem (`dev`, `test`), never a path (`../b/dev`)."""
    import re

    from pipeline.config import RUN_NAME_PATTERN

    if not re.fullmatch(RUN_NAME_PATTERN, value):
        raise ValueError(
            f"{flag} {value!r}: a split is a file name without its extension (dev, test, ...), "
            "not a path"
        )
    return value


def _positive_float(value: str) -> float:
    """argparse type: a finite number > 0 (no nan, inf or negative learning rates)."""
    import math

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return number


def _check_output_file(path: Path, flag: str = "--output") -> None:
    """Before any work: `path` can be written as a file (not a directory; its directory exists
    or can be created, and takes a new file). Raises ValueError naming `flag` and the path."""
    from pipeline.config import _write_problem

    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name, e.g. {path}/eval.json")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: the file is not writable")
    problem = _write_problem(path.parent)
    if problem:
        raise ValueError(f"{flag} {path}: {problem}")


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import check_encoder_max_length, check_writable_outputs, load_config
    from pipeline.data import format_stats, load_tasks, warn_large_batch
    from pipeline.features import resolve_encoder_path
    from pipeline.jobs.retrain import check_evaluation_data, check_promotion_config

    config = load_config(args.config, data_dir=args.data_dir, overrides=_overrides(args.set))
    check_writable_outputs(config, source=str(args.config))
    encoder_path = resolve_encoder_path(config.encoder.path, config.encoder.allow_download)
    check_encoder_max_length(config, encoder_path, source=str(args.config))
    check_promotion_config(config)  # retrain checks it too, but only once a job runs
    tasks = load_tasks(config)
    check_evaluation_data(config)  # promotion.eval_data_dir, if set
    warn_large_batch(tasks, config.train.batch_size)
    print(format_stats(tasks))
    print(f"{args.config}: OK ({len(tasks)} tasks)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config, select_tasks
    from pipeline.train.driver import format_stage_table, train

    config = load_config(args.config, data_dir=args.data_dir, overrides=_overrides(args.set))
    if args.tasks:
        config = select_tasks(config, [t.strip() for t in args.tasks.split(",") if t.strip()])
    if args.address:
        config.scaling.address = args.address
    result = train(config, run_name=_run_name(args.run_name))
    rec = result.record
    print()
    print("What each stage did (dev accuracy, %):")
    print(format_stage_table(rec.stages))
    print(f"\nselected model: dev macro-average accuracy {rec.dev_macro_accuracy:.2f}")
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    import shlex

    from pipeline.config import load_config
    from pipeline.experiments.options import ExperimentOptions
    from pipeline.experiments.suite import parse_list, run_experiment, summary_text

    config = load_config(args.config, data_dir=args.data_dir, overrides=_overrides(args.set))
    opts = {"margin": args.margin, "noise_task": args.noise_task, "new_task": args.new_task}
    if args.capacities:
        opts["capacities"] = parse_list(args.capacities, int, "--capacities")
    if args.noise_fractions:
        opts["noise_fractions"] = parse_list(args.noise_fractions, float, "--noise-fractions")
    if args.variants:
        opts["variants"] = parse_list(args.variants, str, "--variants")
    result = run_experiment(
        config,
        args.suite,
        args.seeds,
        ExperimentOptions(**opts),
        config_path=str(args.config),
        command=" ".join(["polytask", *map(shlex.quote, args.argv)]),
        output=args.output,
        resume=args.resume,
        executor="local" if args.in_process else "ray",
        address=args.address,
        report_only=args.report_only,
    )
    report = result.suite_dir / "report.md"
    print(f"\n{summary_text(report)}\n")
    print(f"report: {report}")
    print(f"plots and numbers: {', '.join(p.name for p in result.files if p != report)}")
    if result.failed:
        print(
            f"error: {len(result.failed)} run(s) failed: {', '.join(result.failed)}; their logs "
            f"are in {result.suite_dir / 'logs'}; retry them with --resume {result.suite_dir}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_add_task(args: argparse.Namespace) -> int:
    from pipeline.incremental import add_tasks, new_task_config, tasks_from_config
    from pipeline.runs import read_record

    run_name = _run_name(args.run_name)
    parent = read_record(args.run)
    if args.config is not None:
        tasks = tasks_from_config(args.config, parent)
    else:
        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        tasks = [
            new_task_config(
                args.task,
                data_dir=args.data_dir,
                train=args.train,
                dev=args.dev,
                format=args.format,
                text_field=args.text_field,
                label_field=args.label_field,
                labels=labels,
            )
        ]
    result = add_tasks(
        args.run,
        tasks,
        run_name=run_name,
        epochs=args.epochs,
        align_epochs=args.align_epochs,
        align_lr=args.align_lr,
    )
    rec = result.record
    for t in rec.lineage.added if rec.lineage else []:
        print(
            f"{t}: dev accuracy {rec.dev[t]['accuracy']:.2f} (macro-F1 {rec.dev[t]['macro_f1']:.2f})"
        )
    print(f"added {', '.join(t.name for t in tasks)} to {parent.run_name} in {result.seconds:.1f}s")
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_remove_task(args: argparse.Namespace) -> int:
    from pipeline.incremental import remove_tasks

    result = remove_tasks(args.run, args.tasks, run_name=_run_name(args.run_name))
    print(f"removed {', '.join(args.tasks)}; run directory: {result.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_run, format_results

    split = _split_name(args.split)
    if args.output:  # before the evaluation's work, not after it
        _check_output_file(args.output)
    results = evaluate_run(args.run, data_dir=args.data_dir, split=split)
    print(format_results(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.output}")
    return 0


def cmd_affinity(args: argparse.Namespace) -> int:
    from pipeline.affinity import run_affinity
    from pipeline.config import load_config

    config = load_config(args.config, data_dir=args.data_dir)
    split = _split_name(args.split)
    out = run_affinity(config, output_dir=args.output, run_dir=args.run, split=split)
    print(f"wrote {out['json']} and {', '.join(str(p) for p in out['plots'])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.calibration import format_calibration
    from pipeline.export import export_run, format_quantization

    result = export_run(
        args.run,
        quantize=args.quantize,
        model_name=args.name,
        register=not args.no_register,
        output_dir=args.output,
    )
    meta = result.metadata
    if meta.quantization is not None:
        print("int8 vs fp32 dev accuracy (%):")
        print(format_quantization(meta.quantization))
    print(
        f"parity: max abs diff {meta.parity.max_abs_diff:.2e} over {len(meta.parity.cases)} "
        f"cases (tolerance {meta.parity.tolerance:g})"
    )
    print(f"precision: {meta.precision}")
    if meta.lineage is not None and meta.lineage.parity is not None:
        lp = meta.lineage.parity
        print(
            f"lineage: {' '.join(lp.tasks)} vs parent {meta.lineage.parent_run}: PyTorch "
            f"{'bit-identical' if lp.exact else f'max abs diff {lp.eager_max_abs_diff:.2e}'}, "
            f"ONNX max abs diff {lp.onnx_max_abs_diff:.2e} ({'passed' if lp.passed else 'FAILED'})"
        )
    print(
        "calibration (per task; dev ECE before, and after: 2-fold cross-fitted, the method "
        "chosen inside each fold, mean of 10 splits):"
    )
    print(format_calibration(meta))
    print(f"artifact directory: {result.artifact_dir}")
    print(f"model tag: {result.tag}" if result.tag else "model tag: (not registered)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.commands import serve

    serve(
        model=args.model,
        port=args.port,
        host=args.host,
        workers=args.workers,
        api_workers=args.api_workers,
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from serving.commands import format_prediction, predict_local

    print(format_prediction(args.texts, predict_local(args.texts, model=args.model)))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.jobs.gate import format_decision
    from pipeline.jobs.retrain import retrain
    from pipeline.runs import check_new_run

    config = load_config(args.config, data_dir=args.data_dir, overrides=_overrides(args.set))
    if args.run_name is not None:  # before the gate's and the store's work, too
        check_new_run(config.storage_path, args.run_name)
    record = retrain(
        config, run_name=args.run_name, model_name=args.name, incremental=args.add_tasks
    )
    print(f"\nchallenger {record.tag} vs champion {record.champion or '(none)'}:")
    print(format_decision(record.decision))
    print(f"run directory: {record.run_dir}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from pipeline.jobs.models import format_versions, list_versions

    print(format_versions(list_versions(args.name)))
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from pipeline.jobs.models import promote

    print(f"promoted {promote(args.tag, by='promote', reason='polytask models promote')}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from pipeline.jobs.models import rollback
    from serving.model_store import model_name

    print(f"promoted {rollback(args.name or model_name())}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.jobs.submit import SubmitError, submit_retrain

    try:
        run_name = submit_retrain(
            args.config,
            address=args.address,
            run_name=_run_name(args.run_name),
            data_dir=args.data_dir,
            allow_insecure_token=args.allow_insecure_token,
        )
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"submitted Ray Job {run_name} (`ray job status {run_name}`)")
    return 0


def cmd_schedule_run(args: argparse.Namespace) -> int:
    from pipeline.jobs.schedule import run_schedules
    from pipeline.jobs.submit import SubmitError

    try:
        run_schedules(
            args.schedule_file,
            args.state_dir,
            address=args.address,
            poll_s=args.poll,
            grace_s=args.grace,
            clock_file=args.clock_file,
            allow_insecure_token=args.allow_insecure_token,
            ray_timeout_s=args.ray_timeout,
        )
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_schedule_status(args: argparse.Namespace) -> int:
    from pipeline.jobs.schedule import status_report

    print(status_report(args.state_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from serving.cli import (
        add_predict_arguments,
        add_serve_arguments,
        bounded_int,
        positive_int,
    )

    parser = argparse.ArgumentParser(
        prog="polytask", description="Train and evaluate multi-task text classifiers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", type=Path, help="run config (YAML)")
        p.add_argument("--data-dir", help="replaces the config's data_root (or POLYTASK_DATA_DIR)")

    def with_insecure_token(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--allow-insecure-token",
            action="store_true",
            help="send the Ray auth token over plain HTTP to a non-loopback address (refused "
            "otherwise; also POLYTASK_ALLOW_INSECURE_TOKEN=1); prefer https:// or an SSH tunnel",
        )

    def with_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field (repeatable), e.g. --set train.epochs=3",
        )

    p = sub.add_parser("validate", help="check a config and its data, report every error")
    with_config(p)
    with_overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train a run on Ray and print its run directory")
    with_config(p)
    with_overrides(p)
    p.add_argument("--address", help="Ray cluster to join (else RAY_ADDRESS, else local)")
    p.add_argument("--run-name", help="run name (default: <name>-<timestamp>-<id>)")
    p.add_argument(
        "--tasks", help="train only these tasks (comma-separated), e.g. a single-task baseline"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "experiment",
        help="a suite of training runs compared in a report (transfer, capacity, noise, "
        "affinity, incremental)",
        description="Train a suite of runs of CONFIG on the Ray cluster (several at a time) and "
        "write report.md, PNG plots and results.json into the suite directory.",
    )
    with_config(p)
    with_overrides(p)
    p.add_argument(
        "--suite",
        required=True,
        choices=["transfer", "capacity", "noise", "affinity", "incremental"],
        help="transfer: single-task vs MTL vs each method; capacity: sweep the shared width; "
        "noise: corrupt one task's labels, equal vs SVD weights; affinity: similarity vs "
        "pairwise transfer; incremental: a task added with add-task vs trained jointly vs alone",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per run (default 3)")
    p.add_argument(
        "--output",
        type=Path,
        help="suite directory (default: <storage_path>/experiments/<name>-<suite>-<time>)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue an interrupted suite: train only the runs without a result",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="with --resume DIR: train nothing, report the runs finished so far (transfer, "
        "capacity)",
    )
    p.add_argument("--address", help="Ray cluster to join (else RAY_ADDRESS, else local)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="train the runs one after another in this process, without Ray",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.5,
        help="transfer: points a change must exceed to count as gain/loss (0.5)",
    )
    p.add_argument(
        "--capacities", help="capacity: comma-separated widths (default 5,10,20,50,100,200,500)"
    )
    p.add_argument("--noise-task", help="noise: the task with corrupted labels (default: first)")
    p.add_argument("--new-task", help="incremental: the task added with add-task (default: last)")
    p.add_argument(
        "--variants",
        help="transfer: comma-separated multi-task variants to train beside the single-task "
        "models: mtl,align,svd,aux,all,routed (the default: all six), and, only when named, "
        "distil (routed, taught by the single-task runs) and own (routed with own paths; "
        "fine-tuned configs)",
    )
    p.add_argument(
        "--noise-fractions",
        help="noise: comma-separated fractions of wrong labels (default 0.2,0.5)",
    )
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("evaluate", help="per-task accuracy and macro-F1 of a run")
    p.add_argument("run", type=Path, help="run directory printed by `polytask train`")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="directory with <task>/<split>.<format> (default: the run's data root)",
    )
    p.add_argument("--split", default="dev", help="dev, test, ... (default dev)")
    p.add_argument("--output", type=Path, help="write the results as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("affinity", help="task covariance similarity (before/after alignment)")
    with_config(p)
    p.add_argument("--run", type=Path, help="a trained run: adds the after-alignment matrix")
    p.add_argument("--split", default="train", help="split whose features are compared")
    p.add_argument("--output", type=Path, default=Path("affinity"), help="output directory")
    p.set_defaults(func=cmd_affinity)

    p = sub.add_parser("export", help="export a run to ONNX and register it in the model store")
    p.add_argument("run", type=Path, help="run directory printed by `polytask train`")
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: tries dynamic and static-QDQ int8 variants; keeps the fastest that loses "
        "at most 0.5 dev points on every task and is faster than fp32",
    )
    p.add_argument("--name", help="model store name (default: polytask-<config name>)")
    p.add_argument("--output", type=Path, help="artifact directory (default: RUN/artifact)")
    p.add_argument(
        "--no-register", action="store_true", help="write the artifact only, skip the store"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "retrain", help="train, export, and promote the new model only if the gate lets it through"
    )
    with_config(p)
    with_overrides(p)
    p.add_argument("--run-name", help="run name (default: <name>-<timestamp>-<id>)")
    p.add_argument("--name", help="model store name (default: polytask-<config name>)")
    p.add_argument(
        "--add-tasks",
        action="store_true",
        help="add the config's tasks that the promoted model lacks to its run, training only "
        "those (the others keep their exact answers; the gate judges only the new ones)",
    )
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "add-task",
        help="train only a new task's heads against a run's fixed encoder and shared module",
        description="Write a new run: RUN's weights unchanged plus the new task's modules "
        "(R, A and its self-auxiliary tower), trained on RUN's features. The new task is "
        "given by --task NAME and the fields of a config's `tasks` entry, or by --config FILE "
        "(its tasks that RUN lacks).",
    )
    p.add_argument("run", type=Path, help="the parent run directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the new task's name")
    which.add_argument("--config", type=Path, help="a config naming the new task(s)")
    p.add_argument("--data-dir", help="data root holding <task>/train and dev (default RUN's)")
    p.add_argument("--train", help="training file (overrides <data-dir>/<task>/train.<format>)")
    p.add_argument("--dev", help="dev file (overrides <data-dir>/<task>/dev.<format>)")
    p.add_argument("--format", choices=["jsonl", "csv", "tsv"], help="default jsonl")
    p.add_argument("--text-field", help="default text")
    p.add_argument("--label-field", help="default label")
    p.add_argument("--labels", help="comma-separated label list, in output order")
    p.add_argument("--epochs", type=positive_int, help="epochs for the new heads (default RUN's)")
    p.add_argument(
        "--align-epochs", type=bounded_int(0), help="Algorithm 1 epochs for R and A (10)"
    )
    p.add_argument("--align-lr", type=_positive_float, help="R's learning rate in them (1e-3)")
    p.add_argument("--run-name", help="run name (default: <parent>+<task>-<id>)")
    p.set_defaults(func=cmd_add_task)

    p = sub.add_parser(
        "remove-task", help="a new run without some tasks (no training; the others unchanged)"
    )
    p.add_argument("run", type=Path, help="the parent run directory")
    p.add_argument("tasks", nargs="+", metavar="NAME", help="task(s) to remove")
    p.add_argument("--run-name", help="run name (default: <parent>-<task>-<id>)")
    p.set_defaults(func=cmd_remove_task)

    p = sub.add_parser("models", help="model store versions: list, promote, rollback")
    models = p.add_subparsers(dest="models_command", required=True)
    q = models.add_parser("list", help="versions with creation time, stage and dev macro")
    q.add_argument("--name", help="only this model name (default: every model in the store)")
    q.set_defaults(func=cmd_models_list)
    q = models.add_parser("promote", help="promote a version (the service follows it)")
    q.add_argument("tag", help="name:version")
    q.set_defaults(func=cmd_models_promote)
    q = models.add_parser("rollback", help="promote the previously promoted version again")
    q.add_argument("--name", help="model name (default: POLYTASK_MODEL_NAME or polytask-senteval6)")
    q.set_defaults(func=cmd_models_rollback)

    # The same arguments as `polytask-serving` (serving/cli.py, the serve image's command).
    p = sub.add_parser("serve", help="serve the model over HTTP (BentoML): POST /predict")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="every task's answer for some texts, from the model store")
    add_predict_arguments(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("submit", help="submit one retraining run to a Ray cluster (a Ray Job)")
    with_config(p)
    p.add_argument("--address", help="Ray dashboard URL (else RAY_ADDRESS, else local :8265)")
    p.add_argument("--run-name", help="run name = submission id (default: <name>-<time>-<hex>)")
    with_insecure_token(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="retrain on cron schedules as Ray Jobs; run history")
    sched = p.add_subparsers(dest="schedule_command", required=True)
    state_help = "scheduler state (SQLite history of every tick), default .polytask/schedule"
    q = sched.add_parser("run", help="the long-running scheduler (Ctrl-C stops it)")
    q.add_argument("schedule_file", type=Path, help="schedule file (YAML), see configs/schedules/")
    q.add_argument("--address", help="Ray dashboard URL (else RAY_ADDRESS, else local :8265)")
    q.add_argument("--state-dir", type=Path, default=Path(".polytask/schedule"), help=state_help)
    q.add_argument("--poll", type=float, default=10.0, help="seconds between passes (10)")
    q.add_argument(
        "--grace",
        type=float,
        default=120.0,
        help="fire (or retry) a due tick at most this many s late (120; must exceed --poll)",
    )
    q.add_argument(
        "--ray-timeout",
        type=float,
        default=30.0,
        help="deadline in s of each call to the Ray dashboard (30)",
    )
    q.add_argument("--clock-file", type=Path, help="tests: read 'now' (ISO 8601) from this file")
    with_insecure_token(q)
    q.set_defaults(func=cmd_schedule_run)
    q = sched.add_parser("status", help="history of scheduled runs and skip counts")
    q.add_argument("--state-dir", type=Path, default=Path(".polytask/schedule"), help=state_help)
    q.set_defaults(func=cmd_schedule_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.experiments.runner import ExperimentError
    from pipeline.export import ExportError
    from pipeline.features import EncoderNotFoundError
    from pipeline.runs import RunNotFoundError
    from pipeline.train.driver import TrainingError

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    _setup_logging(args.verbose)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe (`| head -1`) fails here, inside the handlers
        return code
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
    except DataError as err:
        print(f"error: {len(err.errors)} data problem(s):", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
    except (
        EncoderNotFoundError,
        ExperimentError,
        ExportError,
        RunNotFoundError,
        TrainingError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as err:  # stdout's reader went away: exit quietly, as `head` expects
        from serving.cli import quiet_broken_pipe

        return quiet_broken_pipe(err)
    return 2


if __name__ == "__main__":
    sys.exit(main())
