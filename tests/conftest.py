"""Shared fixtures: a tiny random BERT saved with save_pretrained, and tiny task data.

Everything is built offline in a session temp dir; no test downloads anything.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import pytest
import yaml

POSITIVE = "good great excellent lovely superb fine wonderful nice".split()
NEGATIVE = "bad awful terrible poor horrible dull boring nasty".split()
TOPICS = {
    "sport": "ball goal team match player score coach league".split(),
    "food": "pizza bread soup cheese salad apple rice pasta".split(),
    "tech": "computer phone software chip robot screen code laptop".split(),
}
FILLER = "the a it is was this that very quite and so with of to".split()


def _sentence(rng: random.Random, keywords: list[str], n_key: int = 2) -> str:
    words = rng.sample(FILLER, 4) + rng.sample(keywords, n_key)
    rng.shuffle(words)
    return " ".join(words)


def make_task_rows(kind: str, n: int, seed: int) -> list[dict]:
    """Rows of a learnable synthetic task: 'sentiment' (2 labels) or 'topic' (3 labels)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if kind == "sentiment":
            label = "positive" if i % 2 else "negative"
            text = _sentence(rng, POSITIVE if label == "positive" else NEGATIVE)
        else:
            label = list(TOPICS)[i % 3]
            text = _sentence(rng, TOPICS[label])
        rows.append({"text": text, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level vocab covering the tiny data."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + sum(TOPICS.values(), [])))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    # transformers 5 takes the vocabulary itself (a dict), not a vocab file path.
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """Two tasks in the SentEval layout: <task>/{train,dev}.jsonl."""
    root = tmp_path_factory.mktemp("tiny-data")
    for name, kind, seed in (("sentiment", "sentiment", 1), ("topic", "topic", 2)):
        write_jsonl(root / name / "train.jsonl", make_task_rows(kind, 48, seed))
        write_jsonl(root / name / "dev.jsonl", make_task_rows(kind, 24, seed + 100))
    return root


def tiny_config_dict(data_dir: Path, encoder_dir: Path, storage: Path, cache: Path) -> dict:
    return {
        "name": "tiny",
        "data_root": str(data_dir),
        "tasks": [{"name": "sentiment"}, {"name": "topic"}],
        "encoder": {"path": str(encoder_dir), "max_length": 16, "batch_size": 32},
        "shared": {"capacity": 16, "dropout": 0.0},
        "aux": {"enabled": True, "kind": "linear", "gamma": 0.5},
        "alignment": {"enabled": True, "epochs": 2, "lr": 1e-3},
        "optim": {"lr": 1e-2},
        "train": {"epochs": 4, "batch_size": 8, "seed": 0},
        "scaling": {"num_workers": 0},
        "storage_path": str(storage),
        "cache_dir": str(cache),
    }


@pytest.fixture
def tiny_config_file(tmp_path, tiny_data_dir, tiny_encoder_dir) -> Path:
    """A YAML run config on the tiny data and encoder, training in Ray Train local mode."""
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_tiny_run(tmp: Path, data_dir: Path, encoder_dir: Path, **train: object) -> Path:
    """Train a tiny local-mode run through the CLI (seconds); returns its run directory."""
    from pipeline.cli import main

    cfg = tiny_config_dict(data_dir, encoder_dir, tmp / "runs", tmp / "cache")
    cfg["train"].update(train)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path)]) == 0
    return Path(out.getvalue().split("run directory: ")[-1].strip())


def tiny_texts(n: int, seed: int = 0) -> list[str]:
    """`n` texts of 1-19 words from the tiny data's vocabulary, of varied lengths (so several
    length buckets), the same for a seed."""
    import numpy as np

    words = "good bad film pizza team coach match soup dull great awful nice league".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 20)))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> Path:
    """A tiny run exported to an artifact (fp32, not registered), shared by the tests that
    only read it: do not modify it."""
    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("tiny-artifact")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    return export_run(run_dir, register=False, output_dir=tmp / "artifact").artifact_dir


def load_repo_script(relative: str):
    """A script of the repository that is not a package module (bench/, scripts/), imported by
    path and registered under its file name."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def reset_bentoml_store() -> None:
    """BentoML resolves BENTOML_HOME once per process and memoizes the store paths
    (simple_di SingletonFactory): drop overrides *and* the memoized values, so that the next
    store access follows the current BENTOML_HOME. `reset()` alone keeps the memoized value."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from simple_di import sentinel

    for name in (
        "bentoml_home",
        "model_store_dir",
        "model_store",
        "bento_store_dir",
        "bento_store",
        "tmp_bento_store_dir",
        "tmp_bento_store",
        "env_store_dir",
        "result_store_file",
        "cloud_config",
    ):
        provider = getattr(BentoMLContainer, name)
        provider.reset()
        if hasattr(provider, "_cache"):
            provider._cache = sentinel


@contextlib.contextmanager
def use_bentoml_home(path: Path):
    """Point the BentoML model store at `path` for the duration."""
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(path)
    reset_bentoml_store()
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old
        reset_bentoml_store()


def ort_logits(artifact: Path, texts: list[str], tasks: list[str]) -> dict[str, object]:
    """Reference logits per task: the artifact's tokenizer.json + model.onnx run directly
    (tokenizers + onnxruntime, one batch), as serving computes them without torch."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(artifact / "model.onnx"), options)
    enc = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }
    logits = session.run([f"logits_{t}" for t in tasks], feeds)
    return dict(zip(tasks, logits, strict=True))


@contextlib.contextmanager
def daemon(
    command: list[str],
    url: str,
    log: Path,
    timeout: float = 30,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
):
    """Run a server in its own process group; yield it once `url` answers 200; stop the whole
    group after (SIGTERM, then SIGKILL)."""
    import signal
    import subprocess
    import time

    import httpx
    import pytest

    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"{command[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{command[0]}: no 200 from {url} in {timeout} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
