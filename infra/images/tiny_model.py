"""A tiny polytask run's inputs: a random 2-layer BERT, two small tasks and a run config.

    python infra/images/tiny_model.py DIR    # writes DIR/encoder/, DIR/data/, DIR/tiny.yaml

`polytask validate|train|export DIR/tiny.yaml` then take seconds on a CPU: the image smoke
tests (infra/images/smoke.py) train and export with it, in the train image or on the host, and
serve the export from the serve image. The run trains in Ray Train's local mode
(`scaling.num_workers: 0`); runs go to DIR/runs, the feature cache to DIR/cache. Needs torch and
transformers (the `train` extra). Standalone on purpose: the train image has no tests/ (whose
conftest.py builds the same kind of model for the test suite).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml

WORDS = {
    "sentiment": {
        "positive": "good great excellent lovely superb fine".split(),
        "negative": "bad awful terrible poor horrible dull".split(),
    },
    "topic": {
        "sport": "ball goal team match player coach".split(),
        "food": "pizza bread soup cheese salad rice".split(),
        "tech": "computer phone software chip robot code".split(),
    },
}
FILLER = "the a it is was this that very quite and so with".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_encoder(path: Path) -> None:
    """A 2-layer, 32-wide random BERT whose word-level vocabulary covers the data."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for task in WORDS.values() for ws in task.values() for w in ws} | set(FILLER))
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)


def write_data(root: Path, seed: int = 0) -> None:
    """Each task's train.jsonl (48 rows) and dev.jsonl (24 rows): filler plus two label words."""
    rng = random.Random(seed)
    for task, labels in WORDS.items():
        for split, n in (("train", 48), ("dev", 24)):
            rows = []
            for i in range(n):
                label = list(labels)[i % len(labels)]
                words = rng.sample(FILLER, 4) + rng.sample(labels[label], 2)
                rng.shuffle(words)
                rows.append({"text": " ".join(words), "label": label})
            out = root / task / f"{split}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_config(out: Path) -> None:
    config = {
        "name": "tiny",
        "data_root": str(out / "data"),
        "tasks": [{"name": task} for task in WORDS],
        "encoder": {"path": str(out / "encoder"), "max_length": 16, "batch_size": 32},
        "shared": {"capacity": 16, "dropout": 0.0},
        "aux": {"enabled": True, "kind": "linear", "gamma": 0.5},
        "alignment": {"enabled": True, "epochs": 1, "lr": 1e-3},
        "optim": {"lr": 1e-2},
        "train": {"epochs": 3, "batch_size": 8, "seed": 0},
        "scaling": {"num_workers": 0},
        "storage_path": str(out / "runs"),
        "cache_dir": str(out / "cache"),
    }
    header = "# A tiny run for the image smoke tests (infra/images/tiny_model.py wrote it).\n"
    (out / "tiny.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_encoder(out / "encoder")
    write_data(out / "data")
    write_config(out)
    print(out / "tiny.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
