"""Smoke tests of the built images, run with buildah (no Docker daemon), on loopback only.

    python infra/images/smoke.py serve [--store DIR]     # make image-smoke-serve
    python infra/images/smoke.py train [--store DIR]     # make image-smoke-train

`serve` starts polytask/serve with a model store mounted where the Deployment mounts it
(/home/polytask/store), running the image's own CMD with only its host and port moved to a free
loopback port; waits for /readyz; checks that /predict answers every task of /tasks, that
/metrics has per-task series, that every process of the service runs as the image's non-root
user, that the image holds neither torch nor training code nor a `polytask` command, and that
`polytask-serving predict` answers in it; then stops it. Without --store it first makes a tiny
model store on the host (infra/images/tiny_model.py, `polytask train`, `polytask export`, with
this interpreter's `polytask`).

`train` runs polytask/train as the Ray pods do (the non-root user, the store volume at
/home/polytask/store): `polytask validate` and a tiny `polytask train` (Ray Train local mode)
and `polytask export` into the store; then a Ray head started by `ray start` from a login shell
(`/bin/bash -lc`, as KubeRay starts it), on free loopback ports, which a Ray client joins. With
--store DIR the store is kept in DIR (owned by the image's user), for `serve --store DIR`.

Every process started in a container is stopped when the test ends, passes or fails (also on
Ctrl-C): its process group, then anything still running inside that container's root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
STORE = "/home/polytask/store"  # the volume's mount path in infra/k8s/ and the images' BENTOML_HOME
USER_ID = 10001  # the Dockerfile's `useradd --uid`
TINY_MODEL = "polytask-tiny"  # `polytask export` of tiny_model.py's config (name: tiny)
TEXTS = ["the team scored a great goal", "this soup was awful and dull"]
# Loopback only, whatever the environment's proxy variables say.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SmokeError(AssertionError):
    """A check failed; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def image_tag(target: str) -> str:
    """The target's tag, from the Dockerfile's header (what build.sh tags), as buildah names it."""
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(rf"docker build --target {target} -t (\S+) \.", text)
    if not m:
        raise SmokeError(f"Dockerfile: no `docker build --target {target}` line in the header")
    return f"localhost/{m.group(1)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- containers
def _root_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # after the name: state ppid pgrp session


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _uid_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Process:
    """A command running in a container (`buildah run`, its own session), stopped by `stop()`."""

    def __init__(self, popen: subprocess.Popen, log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path
        self.rootfs: str | None = None  # the chroot of this run, once its first process is seen

    def inside(self) -> list[int]:
        """Processes running inside this run's root file system (by their root, not session)."""
        if self.rootfs is None:
            for pid in _pids():
                root = _root_of(pid)
                if _session_of(pid) == self.popen.pid and root not in (None, "/"):
                    self.rootfs = root
                    break
        if self.rootfs is None:
            return []
        return [
            pid
            for pid in _pids()
            if (root := _root_of(pid)) == self.rootfs or (root or "").startswith(self.rootfs + "/")
        ]

    def output(self, tail: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def stop(self, grace: float = 20) -> None:
        self.inside()  # learn the root before the first process is gone
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            for pid in self.inside():  # also those that left the session
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.popen.poll() is not None and not self.inside():
                    return
                time.sleep(0.2)
        left = self.inside()
        if left:
            raise SmokeError(f"processes still running in the container: {left}")


class Container:
    """A buildah working container of an image; every command it ran is stopped at the end."""

    def __init__(self, image: str, volumes: dict[Path, str], env: dict[str, str]) -> None:
        self.image = image
        self.volumes = volumes
        self.env = env
        self.name = f"polytask-smoke-{os.getpid()}-{int(time.time())}"
        self.logs = Path(tempfile.mkdtemp(prefix="polytask-smoke-logs-"))
        self.started: list[Process] = []
        subprocess.run(
            ["buildah", "from", "--pull-never", "--name", self.name, image],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def start(self, command: Sequence[str], name: str) -> Process:
        """Start `command` in the container in the background (its own session)."""
        args = ["buildah", "run", "--isolation", "chroot"]
        for host, path in self.volumes.items():
            args += ["--volume", f"{host}:{path}"]
        for key, value in self.env.items():
            args += ["--env", f"{key}={value}"]
        log_path = self.logs / f"{len(self.started):02d}-{name}.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                [*args, "--", self.name, *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = Process(popen, log_path)
        self.started.append(process)
        return process

    def run(self, command: Sequence[str], name: str, timeout: float = 600) -> str:
        """Run `command` to its end; its output, or SmokeError with the output's tail."""
        process = self.start(command, name)
        try:
            code = process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise SmokeError(
                f"{name}: still running after {timeout:.0f} s\n{process.output()}"
            ) from err
        finally:
            process.stop()
        if code != 0:
            raise SmokeError(f"{name}: exit status {code}\n{process.output()}")
        return process.log_path.read_text(errors="replace")

    def image_config(self) -> dict:
        """The image's OCI config (Cmd, User, Env, ...)."""
        out = subprocess.run(
            ["buildah", "inspect", "--type", "image", self.image],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out)["OCIv1"]["config"]

    def close(self) -> None:
        errors = []
        for process in reversed(self.started):
            try:
                process.stop()
            except SmokeError as err:
                errors.append(str(err))
        subprocess.run(["buildah", "rm", self.name], stdout=subprocess.DEVNULL, check=False)
        shutil.rmtree(self.logs, ignore_errors=True)
        if errors:
            raise SmokeError("; ".join(errors))


@contextmanager
def container(image: str, volumes: dict[Path, str], env: dict[str, str]) -> Iterator[Container]:
    box = Container(image, volumes, env)
    try:
        yield box
    finally:
        box.close()


def owned_store(path: Path) -> Path:
    """The store directory, owned by the image's user (it writes there, as on the volume)."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        os.chown(p, USER_ID, USER_ID, follow_symlinks=False)
    return path


# --------------------------------------------------------------------------- HTTP
def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with HTTP.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def post_json(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with HTTP.open(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read().decode(errors="replace")}


def wait_ready(base: str, server: Process, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.popen.poll() is not None:
            raise SmokeError(f"the server exited ({server.popen.returncode})\n{server.output()}")
        try:
            if get(f"{base}/readyz", timeout=5)[0] == 200:
                return time.monotonic() - start
        except OSError:
            pass  # not listening yet
        time.sleep(1)
    raise SmokeError(f"/readyz not 200 after {timeout:.0f} s\n{server.output()}")


# --------------------------------------------------------------------------- serve
def tiny_store_on_host(work: Path) -> Path:
    """A model store with one tiny model, trained and exported with this interpreter's polytask."""
    bin_dir = Path(sys.executable).parent
    polytask = bin_dir / "polytask"
    if not polytask.exists():
        raise SmokeError(f"{polytask} not found: run with the project's virtualenv (make install)")
    log("making a tiny model store on the host (tiny_model.py, polytask train, polytask export)")
    store = work / "store"
    env = {**os.environ, "BENTOML_HOME": str(store / "bentoml")}

    def run(*command: object) -> str:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SmokeError(f"{command}: exit status {done.returncode}\n{done.stderr[-3000:]}")
        return done.stdout

    run(sys.executable, HERE / "tiny_model.py", work / "tiny")
    trained = run(polytask, "train", work / "tiny" / "tiny.yaml")
    run_dir = re.search(r"^run directory: (.+)$", trained, re.MULTILINE).group(1)
    log(f"exported: {run(polytask, 'export', run_dir).splitlines()[-1]}")
    return store


def serving_command(image_cmd: list[str], port: int) -> list[str]:
    """The image's CMD with its --host and --port values moved to loopback and a free port."""
    command = list(image_cmd)
    for flag, expected, value in (
        ("--host", "0.0.0.0", "127.0.0.1"),
        ("--port", "3000", str(port)),
    ):
        if flag not in command or command[command.index(flag) + 1] != expected:
            raise SmokeError(f"the serve image's CMD {image_cmd} does not say `{flag} {expected}`")
        command[command.index(flag) + 1] = value
    return command


def check_predictions(base: str) -> list[str]:
    status, body = get(f"{base}/tasks")
    if status != 200:
        raise SmokeError(f"/tasks: {status} {body}")
    tasks = json.loads(body)["tasks"]
    status, answer = post_json(f"{base}/predict", {"texts": TEXTS})
    if status != 200:
        raise SmokeError(f"/predict: {status} {answer}")
    if len(answer["results"]) != len(TEXTS):
        raise SmokeError(f"/predict: {len(answer['results'])} results for {len(TEXTS)} texts")
    for result in answer["results"]:
        if set(result["tasks"]) != set(tasks):
            raise SmokeError(
                f"/predict answered {sorted(result['tasks'])}, tasks are {sorted(tasks)}"
            )
        for task, got in result["tasks"].items():
            if got["label"] not in tasks[task]["labels"] or not 0 <= got["probability"] <= 1:
                raise SmokeError(f"/predict: task {task}: {got} (labels {tasks[task]['labels']})")
    log(f"/predict answered every task for {len(TEXTS)} texts: {sorted(tasks)}")
    return sorted(tasks)


def check_metrics(base: str, tasks: list[str]) -> None:
    status, text = get(f"{base}/metrics")
    if status != 200:
        raise SmokeError(f"/metrics: {status}")
    families = ("polytask_predictions_total{", "polytask_prediction_confidence_count{")
    for family in families:
        for task in tasks:
            if not any(
                line.startswith(family) and f'task="{task}"' in line for line in text.splitlines()
            ):
                raise SmokeError(f"/metrics: no {family}...}} series for task {task}")
    log(
        f"/metrics has per-task series ({', '.join(tasks)}) of {', '.join(f[:-1] for f in families)}"
    )


def check_users(server: Process) -> None:
    pids = server.inside()
    uids = {pid: _uid_of(pid) for pid in pids}
    if not pids or any(uid != USER_ID for uid in uids.values()):
        raise SmokeError(f"processes of the service and their uids: {uids} (expected {USER_ID})")
    log(f"all {len(pids)} processes of the service run as uid {USER_ID}")


def check_contents(box: Container) -> None:
    out = box.run(
        [
            "python",
            "-c",
            "import importlib.util as u, shutil; "
            "print('modules:', [m for m in ('torch', 'pipeline', 'ray', 'transformers') if u.find_spec(m)]); "
            "print('polytask:', shutil.which('polytask'), 'polytask-serving:', shutil.which('polytask-serving'))",
        ],
        "contents",
    )
    if "modules: []" not in out or "polytask: None" not in out or "polytask-serving: None" in out:
        raise SmokeError(
            f"the serve image should hold no torch, training code or `polytask`: {out}"
        )
    log("the serve image holds no torch, pipeline, ray, transformers nor `polytask`")


def smoke_serve(store: Path | None) -> None:
    image = image_tag("serve")
    work = Path(tempfile.mkdtemp(prefix="polytask-smoke-serve-", dir=BUILD))
    try:
        store = owned_store(store or tiny_store_on_host(work))
        env = {"POLYTASK_MODEL_NAME": TINY_MODEL, "POLYTASK_ORT_THREADS": "1"}
        with container(image, {store: STORE}, env) as box:
            check_contents(box)
            port = free_port()
            command = serving_command(box.image_config()["Cmd"], port)
            log(f"{image}: {' '.join(command)} (the image's CMD on 127.0.0.1:{port})")
            server = box.start(command, "serve")
            base = f"http://127.0.0.1:{port}"
            log(f"/readyz is 200 after {wait_ready(base, server, timeout=300):.0f} s")
            tasks = check_predictions(base)
            check_metrics(base, tasks)
            check_users(server)
            server.stop()
            log("the server stopped")
            # The image's command for people: `serve` (loopback by default) and `predict`.
            port = free_port()
            server = box.start(["polytask-serving", "serve", "--port", str(port)], "cli-serve")
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, server, timeout=300)
            check_predictions(base)
            server.stop()
            log("`polytask-serving serve` serves in the image")
            out = box.run(["polytask-serving", "predict", *TEXTS], "predict")
            if not all(task in out for task in tasks):
                raise SmokeError(f"polytask-serving predict: {out}")
            log("`polytask-serving predict` answers every task in the image")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("serve image: OK")


# --------------------------------------------------------------------------- train
def smoke_train(keep_store: Path | None) -> None:
    image = image_tag("train")
    work = Path(tempfile.mkdtemp(prefix="polytask-smoke-train-", dir=BUILD))
    store = keep_store or work / "store"
    if store.exists() and any(store.iterdir()):
        if not store.is_relative_to(BUILD):
            raise SmokeError(f"--store {store}: not empty (only a folder under {BUILD} is cleared)")
        shutil.rmtree(store)
    owned_store(store)
    shutil.copy(HERE / "tiny_model.py", store / "tiny_model.py")
    config = f"{STORE}/tiny/tiny.yaml"
    try:
        with container(image, {store: STORE}, {"POLYTASK_CACHE_DIR": f"{STORE}/cache"}) as box:
            out = box.run(["python", f"{STORE}/tiny_model.py", f"{STORE}/tiny"], "tiny-model")
            out = box.run(["polytask", "validate", config], "validate")
            if f"{config}: OK" not in out:
                raise SmokeError(f"polytask validate: {out}")
            log("polytask validate: OK")
            start = time.monotonic()
            out = box.run(["polytask", "train", config], "train", timeout=900)
            run_dir = re.search(r"^run directory: (.+)$", out, re.MULTILINE)
            if not run_dir:
                raise SmokeError(f"polytask train printed no run directory:\n{out[-3000:]}")
            log(
                f"polytask train (local mode): {run_dir.group(1)} in {time.monotonic() - start:.0f} s"
            )
            out = box.run(["polytask", "export", run_dir.group(1)], "export", timeout=900)
            tag = re.search(r"^model tag: (\S+)$", out, re.MULTILINE)
            if not tag or not tag.group(1).startswith(f"{TINY_MODEL}:"):
                raise SmokeError(f"polytask export registered no {TINY_MODEL}:\n{out[-3000:]}")
            log(f"polytask export: {tag.group(1)} in the store")
            smoke_ray(box)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("train image: OK")


def smoke_ray(box: Container) -> None:
    """`ray start --head --block` from a login shell, as KubeRay runs it; a client joins it."""
    ports = {
        "port": free_port(),
        "ray-client-server-port": free_port(),
        "dashboard-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "metrics-export-port": free_port(),
    }
    flags = " ".join(f"--{k}={v}" for k, v in ports.items())
    # KubeRay: `/bin/bash -lc -- "ulimit -n 65536; ray start --head --block ..."`; here on
    # loopback, one CPU and a small object store, and without ulimit (the sandbox forbids it).
    head = box.start(
        [
            "/bin/bash",
            "-lc",
            "command -v ray && exec ray start --head --block --node-ip-address=127.0.0.1 "
            f"--dashboard-host=127.0.0.1 --num-cpus=1 --object-store-memory=100000000 {flags}",
        ],
        "ray-head",
    )
    address = f"127.0.0.1:{ports['port']}"
    script = (
        "import ray, time\n"
        "for _ in range(60):\n"
        "    try:\n"
        f"        ray.init(address='{address}'); break\n"
        "    except Exception as err:\n"
        "        last = err; time.sleep(2)\n"
        "else:\n"
        "    raise last\n"
        "print('cluster CPUs:', ray.cluster_resources().get('CPU'))\n"
        "print('remote:', ray.get(ray.remote(lambda: 'ok').remote()))\n"
    )
    try:
        out = box.run(["/bin/bash", "-lc", f'python -c "{script}"'], "ray-client", timeout=240)
        if "cluster CPUs: 1.0" not in out or "remote: ok" not in out:
            raise SmokeError(f"Ray client:\n{out[-3000:]}\nhead:\n{head.output()}")
        log(f"ray start from a login shell: head at {address} ran a task")
    finally:
        head.stop()
    log("the Ray head stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", choices=["serve", "train"])
    parser.add_argument(
        "--store",
        type=Path,
        help="serve: a model store to mount (default: a tiny one made here); "
        "train: where to keep the store it exports into",
    )
    args = parser.parse_args(argv)
    # `kill` or a CI timeout stops the test the way Ctrl-C does: containers are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    BUILD.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        if args.image == "serve":
            smoke_serve(args.store.resolve() if args.store else None)
        else:
            smoke_train(args.store.resolve() if args.store else None)
    except SmokeError as err:
        print(f"error: {args.image} image smoke test: {err}", file=sys.stderr)
        return 1
    log(f"{args.image} image smoke test passed in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
