"""The exported artifact: the only contract between `pipeline/` (which writes it) and `serving/`
(which reads it). Serving imports neither torch nor training code.

An artifact directory holds:
    model.onnx        inputs input_ids, attention_mask (int64 [batch, seq]); one logits output
                      per task, named `logits_<task>`, in `tasks` order
    tokenizer files   what AutoTokenizer/tokenizers saved (tokenizer.json at least)
    metadata.json     ArtifactMetadata below

These three files are the artifact's own: regular files, never symbolic links (`artifact_file`),
so that what was checked is what is served and copied into the model store.
"""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask")
# Most knots of a top-label calibration map (two per isotonic block; dev sets give far fewer).
MAX_KNOTS = 4096
# Temperatures an artifact may carry. pipeline/calibration.py fits T within T_BOUNDS
# (0.05, 20): a model 20x over- or under-confident is beyond what scaling should fix. This
# range holds that with 5x to spare (hand-planted temperatures too) and refuses what is no
# calibration: T = 1e30 or inf makes every answer uniform, T = 1e-300 overflows the softmax.
TEMPERATURE_RANGE = (0.01, 100.0)
# Shortest encoder.max_length: [CLS], one token of the text, [SEP]. Below it no text reaches
# the model (the runtime cuts texts to max_length x CHARS_PER_TOKEN characters, so 0 empties
# them) and every text gets the same answer.
MIN_MAX_LENGTH = 3


class ArtifactError(ValueError):
    """An artifact file that breaks the contract: the message names the file and the field (or
    the line) and says why."""


class _Strict(BaseModel):
    # Unknown keys are refused (a typo is not silently dropped), and so are NaN and infinite
    # floats: JSON's Infinity, NaN or 1e400 in metadata.json is a broken export, never a value.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskMetrics(_Strict):
    accuracy: float = Field(description="Percent.")
    macro_f1: float = Field(description="Percent.")
    n: int


class Calibration(_Strict):
    """Calibration of one task head, fitted on dev at export (pipeline/calibration.py). The
    runtime divides the task's logits by `temperature` before the softmax; with `method`
    "temperature+isotonic" it then maps the answered class's probability through the knots
    (`serving.runtime.top_label_map`: linear between knots, the answer never changes). ECE in
    percent, 15 equal-width bins over the top-class confidence."""

    method: Literal["temperature", "temperature+isotonic"] = "temperature"
    temperature: float = Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    knots_x: list[float] | None = Field(
        default=None,
        max_length=MAX_KNOTS,
        description="temperature+isotonic: top-class probabilities after the temperature, "
        "ascending, in [0, 1].",
    )
    knots_y: list[float] | None = Field(
        default=None,
        max_length=MAX_KNOTS,
        description="temperature+isotonic: the calibrated probability at each knot, "
        "non-decreasing, in [0, 1].",
    )
    ece_before: float = Field(description="Dev ECE with T = 1, percent.")
    ece_after: float = Field(
        description="Dev ECE after calibration, cross-fitted (each fold scored with the map "
        "fitted, method choice included, on the other folds; mean over `repeats` random "
        "splits), percent."
    )
    ece_after_in_sample: float = Field(
        description="Dev ECE with the map fitted on all of dev (optimistic), percent."
    )
    ece_after_temperature: float | None = Field(
        default=None,
        description="Cross-fitted dev ECE of the temperature alone (same splits), percent.",
    )
    nll_before: float
    nll_after: float = Field(description="Cross-fitted.")
    bins: int
    folds: int
    repeats: int = Field(default=1, ge=1, description="Random splits averaged in ece_after.")
    n: int

    @model_validator(mode="after")
    def _knots_match_the_method(self) -> Calibration:
        xs, ys = self.knots_x, self.knots_y
        if self.method == "temperature":
            if xs is not None or ys is not None:
                raise ValueError("knots_x/knots_y: only for method temperature+isotonic")
            return self
        if xs is None or ys is None or len(xs) != len(ys) or not xs:
            raise ValueError(
                "knots_x/knots_y: method temperature+isotonic needs both, of equal length >= 1"
            )
        for name, values in (("knots_x", xs), ("knots_y", ys)):
            bad = next((i for i, v in enumerate(values) if not 0.0 <= v <= 1.0), None)
            if bad is not None:
                raise ValueError(f"{name}[{bad}]: {values[bad]} is outside [0, 1]")
            bad = next((i for i in range(1, len(values)) if values[i] < values[i - 1]), None)
            if bad is not None:
                raise ValueError(f"{name}[{bad}]: {values[bad]} is below the knot before it")
        return self


class DevReference(_Strict):
    """What the served model (temperature applied) answers on dev: the service exports it as
    gauges, for drift alerts against live traffic."""

    label_share: dict[str, float] = Field(description="Predicted label -> share of dev texts.")
    confidence_mean: float = Field(description="Mean top-class probability.")
    confidence_quantiles: dict[str, float] = Field(
        description='Quantile ("0.1", "0.25", ...) -> top-class probability.'
    )
    truncated_share: float = Field(description="Share of dev texts cut to max_length.")
    n: int


class TaskOwnRoute(_Strict):
    """The task's own path (routing.own: its own copy of the encoder's top blocks and a head)
    against the shared-or-private route: taken only when it led by more than `margin_se`
    standard errors, since its blocks run once more per call."""

    against: Literal["shared", "private"]
    accuracy: float = Field(description="Dev accuracy of the own path, percent.")
    difference: float = Field(description="own - that route, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    p_value: float = Field(description="One-sided: P(own leading by this much | paths equal).")
    margin_se: float
    layers: int = Field(description="Top encoder blocks the own path copies.")


class TaskRoute(_Strict):
    """Which path answers the task in model.onnx, and the dev evidence for the choice
    (pipeline/routing.py): the preferred path unless the other one beat it by more than
    `margin_se` standard errors of the paired per-item difference."""

    path: Literal["shared", "private", "own"]
    shared_accuracy: float = Field(description="Dev accuracy of the shared path, percent.")
    private_accuracy: float = Field(description="Dev accuracy of the private path, percent.")
    difference: float = Field(description="private - shared, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    p_value: float = Field(
        description="One-sided: the path that is not preferred better than the preferred one."
    )
    margin_se: float
    prefer: Literal["shared", "private"] = Field(
        default="shared",
        description="The path kept without evidence (artifacts before session 7: shared).",
    )
    n: int = Field(description="Dev items the choice was made on.")
    own: TaskOwnRoute | None = Field(
        default=None, description="The own path's evidence, when the run trained one."
    )


class TaskInfo(_Strict):
    name: str = Field(min_length=1)
    labels: list[str] = Field(
        min_length=2, description="Class labels in logit index order, each once."
    )
    output: str = Field(
        description="Name of this task's logits output in model.onnx: `output_name(name)`."
    )
    dev: TaskMetrics | None = Field(default=None, description="Dev metrics of the trained run.")
    route: TaskRoute | None = Field(
        default=None, description="The task's path (routing on); None: shared, no routing."
    )
    calibration: Calibration | None = Field(
        default=None, description="Temperature scaling; None: T = 1 (older artifacts)."
    )
    dev_reference: DevReference | None = Field(
        default=None, description="Dev label mix and confidence, for drift monitoring."
    )

    @model_validator(mode="after")
    def _labels_and_output_fit(self) -> TaskInfo:
        # A label listed twice answers with one of the two and drops the other's probability;
        # an output of another task's name answers with that task's head.
        repeated = _repeated(self.labels)
        if repeated:
            raise ValueError(f"labels: {repeated} listed more than once")
        if self.output != output_name(self.name):
            raise ValueError(
                f"output: {self.output!r}, but task {self.name!r} is answered by "
                f"{output_name(self.name)!r}"
            )
        ys = self.calibration.knots_y if self.calibration is not None else None
        chance = 1.0 / len(self.labels)
        if ys and max(ys) < chance:
            # The answered class's softmax probability is at least 1/K, and an isotonic fit's
            # top block is at least the head's dev accuracy: a map that never reaches chance
            # (all zeros, say) comes from no working head, and would pin every answer's
            # probability just above the runner-up's.
            raise ValueError(
                f"calibration.knots_y: every value is below chance (1/{len(self.labels)} = "
                f"{chance:.3g}; the largest is {max(ys):.3g}): not the top-label map of a "
                "working head"
            )
        return self


class EncoderInfo(_Strict):
    name: str = Field(description="Encoder directory or id the run was trained with.")
    fingerprint: str
    max_length: int = Field(
        ge=MIN_MAX_LENGTH,
        description="Texts are truncated to this many tokens, special tokens included.",
    )
    pooling: str
    dim: int = Field(gt=0)
    # Absent in artifacts of frozen runs exported before fine-tuning existed: frozen.
    trainable_layers: int | Literal["all"] = Field(
        default=0, description="Top encoder blocks trained by the run (0: frozen; all: every one)."
    )
    fine_tuned_blocks: list[int] = Field(
        default_factory=list,
        description="1-based indices of the encoder blocks whose weights the run changed; the "
        "graph carries them, the other blocks are the pretrained encoder's.",
    )


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
    exporter: Literal["torchscript", "dynamo"] | None = Field(
        default=None,
        description="The torch ONNX exporter that wrote the checked graph (None: not recorded, "
        "artifacts before session 5, all dynamo).",
    )
    checked: Literal["shipped", "fp32"] | None = Field(
        default=None,
        description="Which graph the cases ran: 'shipped' (the artifact's model.onnx), or "
        "'fp32' (an int8 artifact: the fp32 graph before quantization, which alone is held to "
        "`tolerance`; the shipped graph's own gap is `shipped_max_abs_diff`). None: not "
        "recorded (artifacts before session 25; their int8 ones were checked on fp32 too).",
    )
    shipped_max_abs_diff: float | None = Field(
        default=None,
        description="An int8 artifact: max abs logit difference of the shipped int8 graph vs "
        "PyTorch on the same cases. Informative, no tolerance: int8 is judged by its dev "
        "accuracy (`quantization`).",
    )


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


class ParentParity(_Strict):
    """An incremental model (add-task / remove-task) against its parent, on probe token
    batches: the logits of every task both answer."""

    tasks: list[str] = Field(description="Tasks shared with the parent (the ones checked).")
    cases: int = Field(description="Probe batches (several shapes, padded and unpadded).")
    exact: bool = Field(description="PyTorch logits bit-identical to the parent's.")
    eager_max_abs_diff: float = Field(description="PyTorch, this model vs the parent.")
    onnx_max_abs_diff: float = Field(description="This model.onnx vs the parent's PyTorch.")
    tolerance: float
    passed: bool = Field(description="Both differences within the tolerance.")


class LineageInfo(_Strict):
    """Where an incremental model comes from; the promotion gate judges only the changed
    tasks when `parity.passed` and the champion is the parent."""

    parent_run: str = Field(description="The parent run's id (its artifact's run_id).")
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    parity: ParentParity | None = Field(
        default=None, description="None when the parent could not be loaded to check."
    )


class ArtifactMetadata(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model_name: str = Field(description="Name in the model store (a BentoML model name).")
    run_id: str
    created: str = Field(description="UTC, ISO 8601.")
    polytask_version: str
    precision: Literal["fp32", "int8"]
    encoder: EncoderInfo
    tasks: list[TaskInfo] = Field(min_length=1, description="At least one; names unique.")
    dev_macro_accuracy: float | None = None
    config_fingerprint: str
    data_fingerprints: dict[str, str]
    parity: ParityReport
    quantization: QuantizationReport | None = None
    lineage: LineageInfo | None = None

    @model_validator(mode="after")
    def _task_names_unique(self) -> ArtifactMetadata:
        repeated = _repeated(self.task_names)
        if repeated:
            raise ValueError(f"tasks: {repeated} listed more than once")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def write(self, directory: Path) -> Path:
        path = Path(directory) / METADATA_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, directory: Path) -> ArtifactMetadata:
        """The metadata.json of `directory`, read strictly: a number where a number is
        declared (the string "2.0" is refused, not converted), finite floats, no unknown keys.

        Raises:
            FileNotFoundError: `directory` has no metadata.json.
            ArtifactError: it is a symbolic link (`artifact_file`), does not parse or breaks
                the schema; the message names the file and the line, or every field at fault.
        """
        path = Path(directory) / METADATA_FILE
        if not path.is_file() and not path.is_symlink():  # a link is refused below, saying so
            raise FileNotFoundError(f"{directory}: not a polytask artifact (no {METADATA_FILE})")
        artifact_file(Path(directory), METADATA_FILE)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ArtifactError(f"{path}: not UTF-8 text ({err.reason})") from err
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as err:
            raise ArtifactError(f"{path}: {_describe_errors(err, text)}") from err


def output_name(task: str) -> str:
    """The ONNX output that carries `task`'s logits."""
    return f"logits_{task}"


def artifact_file(directory: Path, name: str) -> Path:
    """`directory / name`, checked to be a regular file of the artifact's own.

    Raises:
        FileNotFoundError: there is no such file.
        ArtifactError: it is a symbolic link (its target lies anywhere, and may change after
            the check) or not a regular file.
    """
    path = Path(directory) / name
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: artifact has no {name}") from None
    if stat.S_ISLNK(mode):
        raise ArtifactError(
            f"{path}: is a symbolic link; an artifact holds its own files, copy the file in"
        )
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{path}: not a regular file")
    return path


def _repeated(values: list[str]) -> list[str]:
    """The values that occur more than once, in first-seen order."""
    counts = Counter(values)
    return [v for v in dict.fromkeys(values) if counts[v] > 1]


def _describe_errors(err: ValidationError, text: str) -> str:
    """A ValidationError of metadata.json in plain words: `line L column C: ...` when the JSON
    does not parse, else `field <path>: <why>` for every error (no pydantic docs links)."""
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        try:
            json.loads(text)
        except json.JSONDecodeError as bad:
            return f"line {bad.lineno} column {bad.colno}: {bad.msg}"
    return "; ".join(_describe_error(e) for e in errors)


def _describe_error(error: ErrorDetails) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, (bool, int, float, str)) and len(repr(value)) <= 40:
        msg = f"{msg} (got {value!r})"
    loc = ".".join(str(part) for part in error["loc"])
    return f"field {loc}: {msg}" if loc else msg
