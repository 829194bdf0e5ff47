"""The one place that calls torch's ONNX exporter.

Three graphs are exported from the same encoder code: the serving artifact (pipeline/export.py),
the frozen feature extractor (pipeline/features.py) and the lower layers of partial fine-tuning
(pipeline/token_cache.py). They must be exported the same way, so that a parity result for one
says something about the others: the dynamo exporter, both inputs int64 [batch, seq] with
dynamic batch and sequence (seq up to `max_length`), the weights inside the .onnx file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

INPUT_NAMES = ("input_ids", "attention_mask")


def dynamo_export(module: Any, path: Path, output_names: list[str], max_length: int) -> None:
    """Export `module` (forward(input_ids, attention_mask), both int64 [B, L]) to `path`.

    Raises whatever the exporter raises (many types); callers name the cause for their user.
    """
    import torch

    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max_length)
    # Example shapes > 1: torch.export specializes dimensions whose example size is 1.
    example_len = min(8, max_length)
    ids = torch.ones(2, example_len, dtype=torch.long)
    mask = torch.ones(2, example_len, dtype=torch.long)
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
