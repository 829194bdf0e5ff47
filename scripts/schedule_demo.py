"""polytask: a real-time run of the scheduler (docs/results.md, "Scheduling").

An every-minute schedule for about 5.5 minutes on a local two-node Ray cluster with token auth
(the cluster of tests/test_schedule_ray.py), jobs of 75 s so that some ticks find the previous
run still going, and the scheduler SIGKILLed and restarted after 160 s. Prints the scheduler's
history and every submission id Ray knows. Run from the repository root:

    .venv/bin/python scripts/schedule_demo.py
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLYTASK = str(Path(sys.executable).with_name("polytask"))
SCHEDULE = """schedules:
  - name: demo
    cron: "* * * * *"
    entrypoint: "python -c 'import time; time.sleep(75)'"
"""


def main() -> None:
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import test_schedule_ray
    from ray.job_submission import JobSubmissionClient

    cluster_gen = test_schedule_ray.ray_cluster.__wrapped__()
    cluster = next(cluster_gen)
    work = Path(tempfile.mkdtemp(prefix="polytask-schedule-demo-"))
    schedule, state = work / "every-minute.yaml", work / "state"
    schedule.write_text(SCHEDULE)
    env = {**cluster["env"], "RAY_AUTH_TOKEN": cluster["token"]}
    cmd = [POLYTASK, "schedule", "run", str(schedule), "--address", cluster["url"]]
    cmd += ["--state-dir", str(state), "--poll", "2"]
    log = (work / "scheduler.log").open("a")

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    t0 = time.time()
    print("start", time.strftime("%H:%M:%S"), flush=True)
    proc = start()
    time.sleep(160)
    print("SIGKILL scheduler", time.strftime("%H:%M:%S"), flush=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    proc = start()
    time.sleep(max(0.0, 330 - (time.time() - t0)))
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    print("stop", time.strftime("%H:%M:%S"), flush=True)
    status = [POLYTASK, "schedule", "status", "--state-dir", str(state)]
    print(subprocess.run(status, capture_output=True, text=True).stdout)
    client = JobSubmissionClient(
        cluster["url"], headers={"Authorization": f"Bearer {cluster['token']}"}
    )
    ids = [j.submission_id for j in client.list_jobs()]
    print("submissions:", sorted(ids))
    print("duplicates:", [k for k, v in collections.Counter(ids).items() if v > 1])
    with contextlib.suppress(StopIteration):  # tears the cluster down
        next(cluster_gen)


if __name__ == "__main__":
    main()
