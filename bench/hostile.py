"""Hostile-mix load check: does any client's input hurt another client's request?

One `polytask serve` on loopback (the artifact registered in a temporary store), then, side by
side in one run:

    (1) clean traffic: closed-loop clients sending valid requests (1-4 dev texts each) for
        `--seconds`; p50 / p99 latency of the valid requests
    (2) the hostile mix: the same valid clients, plus `--hostile` clients (together
        `--concurrency`) sending, in turn, poison texts (lone surrogates, over-long texts), oversized bodies (over
        Content-Length and chunked), deeply nested and malformed JSON, huge numbers, invalid
        UTF-8, wrong types and content types; and `--slow` connections that send nothing,
        half a request head, or a head trickled a byte at a time (slowloris), each opened
        again as soon as the server closes it; the service's readiness polled throughout

and prints: valid requests failed (must be 0), hostile requests by status, whether /readyz
ever failed, the valid p99 under the mix next to the clean p99 (target: within 3x), the time
to refuse a 20 MB body, the service's memory before and after, how long the server held the
slow connections and what it answered them, and /metrics' rejections by reason.

    python bench/hostile.py [ARTIFACT_DIR]      # default: runs/latest/artifact
        [--seconds 60] [--concurrency 32] [--hostile 8] [--hostile-rate R] [--slow 64]
        [--threads N]

Hostile clients run in a process of their own. By default each sends at the pace a valid client
had in the clean phase, so they are their share of the traffic (8 of 32 clients: about a
quarter of the requests); `--hostile-rate 0` makes them a closed-loop flood instead (every
refusal is answered in about a millisecond, so they then send most of the requests).

Figures depend on the machine's load; compare the two phases of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve import Server, dev_texts  # noqa: E402  (bench/serve.py: the same server harness)

JSON = {"content-type": "application/json"}


def hostile_requests() -> list[tuple[str, bytes | object, dict[str, str]]]:
    """(kind, body, headers): every way issue 9 found to hurt the service, and a few more."""
    huge_text = b"x" * (2 << 20)

    def chunked():  # 2 MB without a Content-Length
        for i in range(0, 2 << 20, 64 << 10):
            yield b'{"texts": ["' if i == 0 else huge_text[i : i + (64 << 10)]

    return [
        ("surrogate", b'{"texts": ["ok \\ud800"]}', JSON),
        ("surrogate_in_list", b'{"texts": ["good", "\\udfff bad", "fine"]}', JSON),
        ("text_too_long", b'{"texts": ["' + b"y " * 30_000 + b'"]}', JSON),
        ("body_too_large", b'{"texts": ["' + huge_text + b'"]}', JSON),
        ("body_chunked", chunked, JSON),
        ("deep_json", b"[" * 100_000 + b"]" * 100_000, JSON),
        ("huge_number", b'{"texts": ["a"], "n": ' + b"9" * 5000 + b"}", JSON),
        ("invalid_utf8", b'{"texts": ["caf\xe9 \xff"]}', JSON),
        ("malformed", b'{"texts": ["a"', JSON),
        ("wrong_type", b'{"texts": ["a"], "return_all_probabilities": "yes"}', JSON),
        ("not_json_type", b'{"texts": ["a"]}', {"content-type": "text/plain"}),
        ("no_content_type", b'{"texts": ["a"]}', {}),
    ]


def _send(http, url: str, body, headers) -> int:
    import httpx

    content = body() if callable(body) else body
    try:
        return http.post(f"{url}/predict", content=content, headers=headers).status_code
    except httpx.TransportError:  # the server closed an oversized upload early: refused
        return 413


def run_phase(
    url: str,
    texts: list[str],
    valid: int,
    hostile: int,
    seconds: float,
    rate: float = 0.0,
    slow: int = 0,
):
    """`valid` closed-loop valid clients and `hostile` hostile ones, each sending `rate`
    requests/s (0: as fast as answers come), with `slow` slow connections; latencies and
    outcomes (the slow connections' among the hostile ones)."""
    import httpx

    latencies: list[float] = []
    valid_failed: Counter[int] = Counter()
    hostile_status: Counter[tuple[str, int]] = Counter()
    not_ready = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def valid_client(k: int) -> None:
        i = k
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop:
                chunk = [texts[(i + j) % len(texts)] for j in range(1 + i % 4)]
                start = time.perf_counter()
                try:
                    code = http.post(f"{url}/predict", json={"texts": chunk}).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    if code == 200:
                        latencies.append(1000 * (time.perf_counter() - start))
                    else:
                        valid_failed[code] += 1
                i += valid

    def watch_ready() -> None:
        with httpx.Client(timeout=10) as http:
            while time.perf_counter() < stop:
                try:
                    ok = http.get(f"{url}/readyz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    not_ready[0] += 1
                time.sleep(0.5)

    # The hostile clients run in a process of their own, as real ones would: in this one they
    # would take the GIL from the valid clients and inflate the latencies measured here.
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    attackers = ctx.Process(
        target=hostile_process, args=(url, hostile, seconds, rate, results, slow)
    )
    if hostile:
        attackers.start()
    threads = [threading.Thread(target=valid_client, args=(k,)) for k in range(valid)]
    threads.append(threading.Thread(target=watch_ready))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held: dict[str, list[float]] = {}
    if hostile:
        counts, held = results.get(timeout=seconds + 120)
        hostile_status.update(counts)
        attackers.join()
    return latencies, valid_failed, hostile_status, not_ready[0], held


SLOW_KINDS = ("slow_silent", "slow_half_head", "slow_trickle")


def slow_connection(url: str, kind: str, stop: float) -> tuple[str, float] | None:
    """One slow connection of `kind`, held until the server closes it or `stop`: (what the
    server answered: its status, or "closed" without an answer; seconds held), or None when
    `stop` came first."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    head = f"POST /predict HTTP/1.1\r\nHost: {parts.hostname}\r\n".encode()
    start = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        if kind == "slow_half_head":
            sock.sendall(head)
        sent = 0
        sock.settimeout(0.5)
        while time.perf_counter() < stop:
            if kind == "slow_trickle":
                try:
                    sock.sendall((head + b"x-pad: " + b"a" * 10_000)[sent : sent + 1])
                    sent += 1
                except OSError:
                    return "closed", time.perf_counter() - start
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return "closed", time.perf_counter() - start
            held = time.perf_counter() - start
            if not data:
                return "closed", held
            status = data.split(b" ", 2)[1].decode(errors="replace") if b" " in data else "?"
            return status, held
    return None


def hostile_process(
    url: str, clients: int, seconds: float, rate: float, results, slow: int = 0
) -> None:
    """`clients` hostile clients for `seconds`, each sending `rate` requests/s (0: closed
    loop, as fast as the answers come), and `slow` slow connections (`slow_connection`, each
    opened again once closed); puts {(kind, status): count} and, under ("held", kind), the
    seconds each slow connection was held."""
    import httpx

    attacks = hostile_requests()
    status: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=60) as http:
            next_send = time.perf_counter()
            while time.perf_counter() < stop:
                if rate > 0:
                    time.sleep(max(0.0, next_send - time.perf_counter()))
                    next_send += 1 / rate
                kind, body, headers = attacks[i % len(attacks)]
                code = _send(http, url, body, headers)
                with lock:
                    status[(kind, code)] += 1
                i += 1

    held: dict[str, list[float]] = {}

    def slow_client(k: int) -> None:
        kind = SLOW_KINDS[k % len(SLOW_KINDS)]
        while time.perf_counter() < stop:
            try:
                outcome = slow_connection(url, kind, stop)
            except OSError:
                outcome = ("refused", 0.0)
                time.sleep(0.1)
            if outcome is None:
                break
            with lock:
                status[(kind, outcome[0])] += 1
                held.setdefault(kind, []).append(outcome[1])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=slow_client, args=(k,)) for k in range(slow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((dict(status), held))


def server_rss(pid: int) -> int:
    """Resident bytes of the server and every process under it (BentoML's workers start their
    own sessions, so the process group would miss them)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def rejections(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "polytask_rejected_requests_total":
                out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
    return out


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, nargs="?", default=REPO / "runs/latest/artifact")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=32, help="clients in the mix")
    parser.add_argument("--hostile", type=int, default=8, help="of which hostile")
    parser.add_argument(
        "--hostile-rate",
        type=float,
        default=None,
        help="requests/s per hostile client (default: a valid client's rate in the clean "
        "phase, so hostile clients are that share of the traffic; 0: as fast as answers come, "
        "a flood)",
    )
    parser.add_argument(
        "--slow",
        type=int,
        default=64,
        help="slow connections in the mix (silent, half a head, a trickled head; 0: none)",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/senteval")
    args = parser.parse_args(argv)
    if not (args.artifact / "model.onnx").is_file():
        raise SystemExit(
            f"{args.artifact}: no exported model; run `make train` (or `polytask export RUN`)"
        )
    import httpx

    texts = dev_texts(args.data_dir)
    with Server(args.artifact, args.threads) as server:
        url, pid = server.url, server.proc.pid
        valid = args.concurrency - args.hostile
        if valid < 1 or args.hostile < 1:
            raise SystemExit("--hostile: between 1 and --concurrency - 1")
        print(
            f"server {url}; {valid} valid clients, then the same plus {args.hostile} hostile "
            f"ones; {args.seconds:.0f} s per phase"
        )
        clean, clean_failed, _, clean_unready, _ = run_phase(url, texts, valid, 0, args.seconds)
        rss_before = server_rss(pid)
        start = time.perf_counter()
        code = _send(
            httpx.Client(timeout=60), url, b'{"texts": ["' + b"z" * (20 << 20) + b'"]}', JSON
        )
        refuse_s = time.perf_counter() - start
        rss_refused = server_rss(pid)
        per_client = len(clean) / args.seconds / valid
        rate = per_client if args.hostile_rate is None else args.hostile_rate
        mixed, failed, hostile, unready, held = run_phase(
            url, texts, valid, args.hostile, args.seconds, rate, args.slow
        )
        rss_after = server_rss(pid)
        reasons = rejections(url)

    print("\n== clean traffic")
    print(
        f"valid requests: {len(clean)} ok, {sum(clean_failed.values())} failed {dict(clean_failed)}"
    )
    print(f"valid latency ms: p50 {pct(clean, 50):.1f}  p99 {pct(clean, 99):.1f}")
    pace = f"{rate:.1f} requests/s each" if rate > 0 else "as fast as answers come (a flood)"
    n_hostile = sum(n for (kind, _), n in hostile.items() if kind not in SLOW_KINDS)
    print(
        f"\n== hostile mix ({valid} valid + {args.hostile} hostile clients, {pace}; "
        f"{args.slow} slow connections)"
    )
    print(
        f"hostile share of the requests: {n_hostile / max(1, n_hostile + len(mixed)):.0%} "
        f"({n_hostile} hostile)"
    )
    print(f"valid requests: {len(mixed)} ok, {sum(failed.values())} failed {dict(failed)}")
    print(f"valid latency ms: p50 {pct(mixed, 50):.1f}  p99 {pct(mixed, 99):.1f}")
    print(
        f"valid p99 under the mix / clean p99: {pct(mixed, 99) / pct(clean, 99):.2f}x (target <= 3x)"
    )
    by_kind: dict[str, Counter[int]] = {}
    for (kind, status), n in hostile.items():
        by_kind.setdefault(kind, Counter())[status] += n
    print("hostile requests by kind -> status:")
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:<20} {dict(counts)}")
    for kind, seconds_held in sorted(held.items()):
        print(
            f"  {kind:<20} held by the server: median {statistics.median(seconds_held):.1f} s, "
            f"longest {max(seconds_held):.1f} s ({len(seconds_held)} connections closed)"
        )
    print(f"/readyz not 200: {clean_unready + unready} of the polls (every 0.5 s)")
    print(
        f"20 MB body: status {code} in {1000 * refuse_s:.0f} ms; service memory "
        f"{rss_before / 2**20:.0f} MiB before it, {rss_refused / 2**20:.0f} MiB after"
    )
    print(
        f"service memory: {rss_refused / 2**20:.0f} MiB before the mix, {rss_after / 2**20:.0f} MiB after"
    )
    print("rejections counted in /metrics by reason:")
    for reason, n in sorted(reasons.items()):
        print(f"  {reason:<24} {n:.0f}")
    bad = sum(failed.values()) + sum(clean_failed.values()) + clean_unready + unready
    print(f"\nRESULT: {'PASS' if bad == 0 else 'FAIL'}: {bad} valid failures or unready polls")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
