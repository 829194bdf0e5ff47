"""The exported artifact: the only contract between `pipeline/` (which writes it) and `serving/`
(which reads it). Serving imports neither torch nor training code.

An artifact directory holds:
    model.onnx        inputs input_ids, attention_mask (int64 [batch, seq]); one logits output
                      per task, named `logits_<task>`, in `tasks` order
    tokenizer files   what AutoTokenizer/tokenizers saved (tokenizer.json at least)
    metadata.json     ArtifactMetadata below
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskMetrics(_Strict):
    accuracy: float = Field(description="Percent.")
    macro_f1: float = Field(description="Percent.")
    n: int


class TaskInfo(_Strict):
    name: str
    labels: list[str] = Field(description="Class labels in logit index order.")
    output: str = Field(description="Name of this task's logits output in model.onnx.")
    dev: TaskMetrics | None = Field(default=None, description="Dev metrics of the trained run.")


class EncoderInfo(_Strict):
    name: str = Field(description="Encoder directory or id the run was trained with.")
    fingerprint: str
    max_length: int = Field(description="Texts are truncated to this many tokens.")
    pooling: str
    dim: int


class ParityCase(_Strict):
    batch_size: int
    seq_len: int
    padded: bool
    max_abs_diff: float


class ParityReport(_Strict):
    """onnxruntime vs PyTorch logits on several shapes, padded and unpadded."""

    tolerance: float
    max_abs_diff: float
    passed: bool
    cases: list[ParityCase]


class QuantizedTask(_Strict):
    fp32_accuracy: float
    int8_accuracy: float
    drop: float = Field(description="fp32 minus int8 dev accuracy, points.")


class QuantizationReport(_Strict):
    """Dynamic int8 quantization, kept only if no task's dev accuracy drops too much."""

    method: Literal["dynamic-int8"] = "dynamic-int8"
    max_drop_allowed: float
    kept: bool
    tasks: dict[str, QuantizedTask]


class ArtifactMetadata(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model_name: str = Field(description="Name in the model store (a BentoML model name).")
    run_id: str
    created: str = Field(description="UTC, ISO 8601.")
    polytask_version: str
    precision: Literal["fp32", "int8"]
    encoder: EncoderInfo
    tasks: list[TaskInfo]
    dev_macro_accuracy: float | None = None
    config_fingerprint: str
    data_fingerprints: dict[str, str]
    parity: ParityReport
    quantization: QuantizationReport | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def write(self, directory: Path) -> Path:
        path = Path(directory) / METADATA_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, directory: Path) -> ArtifactMetadata:
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a polytask artifact (no {METADATA_FILE})")
        return cls.model_validate(json.loads(path.read_text()))


def output_name(task: str) -> str:
    """The ONNX output that carries `task`'s logits."""
    return f"logits_{task}"
