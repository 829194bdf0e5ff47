"""The one place that calls torch's ONNX exporter.

Three graphs are exported from the same encoder code: the serving artifact (pipeline/export.py),
the frozen feature extractor (pipeline/features.py) and the lower layers of partial fine-tuning
(pipeline/token_cache.py). All take int64 `input_ids` and `attention_mask` [batch, seq] with
dynamic batch and sequence (seq up to `max_length`) and keep the weights inside the .onnx file.

Two exporters: TorchScript (every graph's first choice) and dynamo (its fallback). Measured
here on all-MiniLM-L6-v2 (encoder + mean pooling, 2 cores, a loaded machine): dynamo 229 s,
TorchScript 19 s, both within 7e-7 of PyTorch; the TorchScript serving graph ran 1.12x the
dynamo one in onnxruntime on the idle machine (docs/results.md, issue 11). Every graph is
checked against PyTorch on several shapes before use, whichever exporter wrote it; the serving
export re-exports with dynamo when a traced graph fails that check.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

INPUT_NAMES = ("input_ids", "attention_mask")

logger = logging.getLogger(__name__)


def dynamo_export(module: Any, path: Path, output_names: list[str], max_length: int) -> None:
    """Export `module` (forward(input_ids, attention_mask), both int64 [B, L]) to `path` with
    the dynamo exporter.

    Raises whatever the exporter raises (many types); callers name the cause for their user.
    """
    import torch

    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max_length)
    ids, mask = _example(max_length)
    with warnings.catch_warnings():
        # Both inputs share the `batch` and `seq` dims; the exporter warns about that.
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        # torch.export's own pytree code trips a deprecation of torch's; not ours to fix.
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        torch.onnx.export(
            module.eval(),
            (ids, mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(output_names),
            dynamic_shapes={
                "input_ids": {0: batch, 1: seq},
                "attention_mask": {0: batch, 1: seq},
            },
            dynamo=True,
            external_data=False,  # weights inside the .onnx file, not a .onnx.data file
            verbose=False,  # the dynamo exporter prints progress to stdout otherwise
        )


def torchscript_export(
    module: Any,
    path: Path,
    output_names: list[str],
    max_length: int,
    output_seq_dim: bool = False,
) -> None:
    """Export `module` to `path` with the TorchScript exporter (traced on one example batch;
    batch and sequence marked dynamic). `output_seq_dim`: the outputs are [B, L, ...] (token
    states) rather than [B, ...] (pooled features, logits)."""
    import torch

    ids, mask = _example(max_length)
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
    for name in output_names:
        axes[name] = {0: "batch", 1: "seq"} if output_seq_dim else {0: "batch"}
    with warnings.catch_warnings():
        # Tracer warnings about Python control flow on shapes: the trace is checked against
        # PyTorch on other shapes before use.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (ids, mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=18,
            dynamo=False,
        )


def export_graph(
    module: Any,
    path: Path,
    output_names: list[str],
    max_length: int,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
    output_seq_dim: bool = False,
) -> Literal["torchscript", "dynamo"]:
    """Export with `exporter`; TorchScript falls back to dynamo when it fails. Returns the
    exporter that wrote the graph."""
    if exporter == "torchscript":
        try:
            torchscript_export(module, path, output_names, max_length, output_seq_dim)
            return "torchscript"
        except Exception as err:  # the tracer raises many types; dynamo may still work
            logger.warning(
                "TorchScript export failed (%s: %s); using the dynamo exporter",
                type(err).__name__,
                err,
            )
    dynamo_export(module, path, output_names, max_length)
    return "dynamo"


def _example(max_length: int) -> tuple[Any, Any]:
    """Two texts of min(8, max_length) tokens, the second padded: shapes > 1, since
    torch.export specializes dimensions whose example size is 1."""
    import torch

    width = min(8, max_length)
    ids = torch.ones(2, width, dtype=torch.long)
    mask = torch.ones(2, width, dtype=torch.long)
    mask[1, max(width - 3, 1) :] = 0
    return ids, mask
