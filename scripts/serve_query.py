"""The last step of the main job (`make train`): serve the newest model over HTTP, send one
query, print the answer, stop the server.

Usage: python scripts/serve_query.py [--model TAG] [--port 3123] "text" ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts", nargs="*", default=["a gripping , funny and moving film ."])
    parser.add_argument("--model", help="model tag (default: promoted, else latest)")
    parser.add_argument("--port", type=int, default=3123)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    args = parser.parse_args()

    polytask = Path(sys.executable).with_name("polytask")
    cmd = [str(polytask), "serve", "--host", "127.0.0.1", "--port", str(args.port)]
    if args.model:
        cmd += ["--model", args.model]
    url = f"http://127.0.0.1:{args.port}"
    print(f"starting: {' '.join(cmd)}", flush=True)
    server = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            if server.poll() is not None:
                print(f"the server exited with status {server.returncode}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print(f"the server was not ready after {args.timeout:.0f} s", file=sys.stderr)
                return 1
            time.sleep(1)
        body = {"texts": args.texts}
        print(f"POST {url}/predict {json.dumps(body)}", flush=True)
        response = httpx.post(f"{url}/predict", json=body, timeout=60)
        print(f"HTTP {response.status_code}")
        print(json.dumps(response.json(), indent=1))
        return 0 if response.status_code == 200 else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
