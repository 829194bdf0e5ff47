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


QuantizationMethod = Literal["dynamic-int8", "static-int8-qdq"]


class QuantizedVariant(_Strict):
    """One int8 variant export tried: which weights it quantizes and how, its dev accuracy per
    task, and its speed next to fp32's, both measured through serving.runtime."""

    name: str
    method: QuantizationMethod
    description: str
    passed: bool = Field(description="No task dropped more than the allowed points.")
    tasks: dict[str, QuantizedTask] = Field(default_factory=dict)
    texts_per_s: float | None = Field(default=None, description="Over every task's dev texts.")
    fp32_texts_per_s: float | None = Field(default=None, description="fp32, in the same run.")
    error: str | None = Field(default=None, description="Why the variant could not be built.")


class QuantizationReport(_Strict):
    """int8 quantization, kept only if no task's dev accuracy drops too much; of the variants
    that pass, the fastest, if it is faster than fp32."""

    method: QuantizationMethod = "dynamic-int8"
    max_drop_allowed: float
    kept: bool
    tasks: dict[str, QuantizedTask] = Field(
        description="Per task, the kept variant's accuracy, else the least-losing variant's."
    )
    variant: str | None = Field(default=None, description="The variant model.onnx holds.")
    variants: list[QuantizedVariant] = Field(default_factory=list)


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
