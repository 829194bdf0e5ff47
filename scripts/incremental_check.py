"""Issue 14's HTTP check: serve a parent run and its add-task child side by side (`polytask
serve` on loopback, each from its own temporary model store), send every task's dev texts to
both, and compare every served probability of the parent's tasks; also score the child's
added tasks on their dev labels from the same HTTP answers.

Usage:
    python scripts/incremental_check.py PARENT_RUN CHILD_RUN [--output check.json]

Both runs are exported first (`RUN/artifact`, not registered in the default store) when they
have no artifact yet. Prints, per task, how many of the dev texts got exactly the parent's
probabilities and the largest difference; exits 1 if any parent task's answer differs by more
than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve import Server  # noqa: E402  (`polytask serve` on a temporary store)

BATCH = 64  # POLYTASK_MAX_TEXTS' default


def artifact_of(run_dir: Path) -> Path:
    """RUN/artifact, exported now (not registered) if missing."""
    from pipeline.export import export_run

    art = run_dir / "artifact"
    if not (art / "metadata.json").is_file():
        print(f"exporting {run_dir} ...", flush=True)
        export_run(run_dir, register=False)
    return art


def dev_data(run_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Task -> (dev texts, dev labels) of every task of the run."""
    from pipeline.data import load_tasks
    from pipeline.runs import read_record

    rec = read_record(run_dir)
    config = rec.run_config()
    tasks = load_tasks(config, splits=["dev"], labels=rec.labels)
    return {
        t.name: (t.splits["dev"].texts, [t.labels[i] for i in t.splits["dev"].labels])
        for t in tasks
    }


def ask(url: str, texts: list[str], tasks: list[str]) -> list[dict]:
    """Every text's answers for `tasks`, all label probabilities, in batches of BATCH."""
    import httpx

    out: list[dict] = []
    with httpx.Client(timeout=120) as http:
        for i in range(0, len(texts), BATCH):
            body = {"texts": texts[i : i + BATCH], "tasks": tasks, "return_all_probabilities": True}
            r = http.post(f"{url}/predict", json=body)
            r.raise_for_status()
            out += r.json()["results"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent", type=Path)
    parser.add_argument("child", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="ORT threads per server")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest allowed diff")
    parser.add_argument("--output", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()

    from pipeline.runs import read_record

    parent_rec, child_rec = read_record(args.parent), read_record(args.child)
    parent_tasks = list(parent_rec.tasks)
    added = [t for t in child_rec.tasks if t not in parent_rec.tasks]
    data = dev_data(args.child)
    texts = [x for t in child_rec.tasks for x in data[t][0]]
    print(f"{len(texts)} dev texts of {', '.join(child_rec.tasks)}", flush=True)

    answers: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for which, run, tasks in (
        ("parent", args.parent, parent_tasks),
        ("child", args.child, list(child_rec.tasks)),
    ):
        with Server(artifact_of(run), args.threads) as server:
            start = time.monotonic()
            answers[which] = ask(server.url, texts, tasks)
            seconds[which] = round(time.monotonic() - start, 1)
        print(f"{which}: {len(texts)} texts over HTTP in {seconds[which]} s", flush=True)

    report: dict[str, dict] = {}
    worst = 0.0
    for t in parent_tasks:
        diffs, exact = [], 0
        for p, c in zip(answers["parent"], answers["child"], strict=True):
            pp, cp = p["tasks"][t]["probabilities"], c["tasks"][t]["probabilities"]
            d = max(abs(pp[k] - cp[k]) for k in pp)
            diffs.append(d)
            exact += pp == cp
        report[t] = {"texts": len(diffs), "exactly_equal": exact, "max_abs_diff": max(diffs)}
        worst = max(worst, max(diffs))
        print(
            f"{t:<8} {exact}/{len(diffs)} texts with exactly the parent's probabilities; "
            f"max abs difference {max(diffs):.3g}"
        )
    offset = {}
    i = 0
    for t in child_rec.tasks:
        offset[t] = i
        i += len(data[t][0])
    for t in added:
        labels = data[t][1]
        got = [
            a["tasks"][t]["label"] for a in answers["child"][offset[t] : offset[t] + len(labels)]
        ]
        acc = 100 * float(np.mean([g == y for g, y in zip(got, labels, strict=True)]))
        report[t] = {"dev_accuracy_http": acc, "n": len(labels)}
        print(f"{t:<8} added: dev accuracy over HTTP {acc:.2f} ({len(labels)} texts)")
    result = {
        "parent": str(args.parent),
        "child": str(args.child),
        "seconds": seconds,
        "tasks": report,
        "max_abs_diff": worst,
        "passed": worst <= args.tolerance,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    print("PASSED" if result["passed"] else "FAILED", f"(max abs difference {worst:.3g})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
