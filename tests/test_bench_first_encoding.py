"""bench/first_encoding.py on the tiny config: both ways encode every split, the report counts
the distinct texts and FLOPs of what each way computes, and nothing is left in /tmp."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from conftest import load_repo_script


def test_both_ways_run_and_report_their_share(tiny_config_file, monkeypatch, capsys):
    bench_script = load_repo_script("bench/first_encoding.py")  # puts the repo on sys.path
    import bench.serve

    monkeypatch.setattr(bench.serve, "matmul_ceiling", lambda threads, dim, ffn: 100.0)
    before = set(Path(tempfile.gettempdir()).glob("polytask-first-encoding-*"))
    assert bench_script.main(["--config", str(tiny_config_file), "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    requests = bench_script.splits(tiny_config_file, 1.0)
    every = [t for texts, _ in requests for t in texts]
    head = re.search(r"(\d+) splits, (\d+) texts \((\d+) distinct\)", out)
    assert head and [int(g) for g in head.groups()] == [
        len(requests),
        len(every),
        len(set(every)),
    ]
    assert out.count("round 1: ") == 2 and out.count("round 2: ") == 2
    for way in ("per split", "one pass"):
        row = re.search(rf"^{way}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%$", out, re.M)
        assert row, out
        seconds, _, gflop_s, share = (float(g) for g in row.groups())
        assert seconds >= 0 and abs(share - gflop_s) <= 1  # share of a 100 GFLOP/s ceiling
    assert "one pass / per split: " in out and "a first train's encoding: " in out
    assert set(Path(tempfile.gettempdir()).glob("polytask-first-encoding-*")) == before
