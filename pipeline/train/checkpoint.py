"""Checkpoints: tensors in safetensors, optimizer state as a plain state dict, the rest JSON.

A checkpoint directory holds:
    model.safetensors   current parameters (heads, plus the encoder when it is fine-tuned)
    best.safetensors    the best parameters so far (by dev macro-average), for model selection
    optim.pt            optimizer/scheduler state dicts, loaded with weights_only=True
    state.json          stage, epoch, history of per-task metrics, best scores
Modules are never pickled: loading needs the code and the run's config, not a class snapshot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIM_FILE = "optim.pt"
STATE_FILE = "state.json"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone detaches both.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(_contiguous(state), str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_checkpoint(
    directory: Path,
    model_state: dict[str, torch.Tensor],
    best_state: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
    state: dict[str, Any],
) -> None:
    """Write a checkpoint directory (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / MODEL_FILE, model_state)
    if best_state is not None:
        save_tensors(directory / BEST_FILE, best_state)
    if optim_state is not None:
        torch.save(optim_state, directory / OPTIM_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def load_checkpoint(
    directory: Path,
) -> tuple[
    dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any] | None, dict[str, Any]
]:
    """Read what save_checkpoint wrote: (model, best or None, optimizer or None, state)."""
    model = load_tensors(directory / MODEL_FILE)
    best = load_tensors(directory / BEST_FILE) if (directory / BEST_FILE).is_file() else None
    optim = None
    if (directory / OPTIM_FILE).is_file():
        optim = torch.load(directory / OPTIM_FILE, weights_only=True)
    state = json.loads((directory / STATE_FILE).read_text())
    return model, best, optim, state
