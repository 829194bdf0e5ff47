"""Device and precision selection, kept apart so that GPU choices are unit-tested on a CPU."""

from __future__ import annotations

import logging
from typing import Literal

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]


def select_precision(
    precision: Precision, device_type: str, bf16_supported: bool
) -> Literal["fp32", "bf16"]:
    """The precision a worker trains in.

    auto picks bf16 autocast on CUDA devices that support it (Ampere and newer) and fp32
    elsewhere. An explicit bf16 on a device without it is an error rather than a silent
    fallback, since the user asked for it.
    """
    if precision == "fp32":
        return "fp32"
    bf16_ok = device_type == "cuda" and bf16_supported
    if precision == "bf16":
        if not bf16_ok:
            raise ValueError(
                f"train.precision: bf16 needs a CUDA device with bf16 support, this worker has "
                f"{device_type!r}; use precision 'auto' or 'fp32'"
            )
        return "bf16"
    return "bf16" if bf16_ok else "fp32"


def check_gpu_request(use_gpu: bool, cuda_available: bool, cluster_gpus: float) -> None:
    """Fail before Ray starts when use_gpu is set and no GPU exists to schedule workers on."""
    if use_gpu and not cuda_available and cluster_gpus <= 0:
        raise ValueError(
            "scaling.use_gpu: true, but the Ray cluster has no GPUs; set use_gpu: false to "
            "train on CPU workers"
        )


def autocast_context(precision: Literal["fp32", "bf16"], device_type: str):
    """A context manager: bf16 autocast, or a no-op for fp32."""
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def driver_device(use_gpu: bool, cuda_available: bool) -> str:
    """Where driver-side training (routing.own's own paths) runs: the driver's GPU when the
    run asked for GPUs and the driver has one, else its CPU (on a cluster whose GPUs are all
    on worker nodes, the driver logs that it trains on CPU)."""
    if use_gpu and not cuda_available:
        logger.warning(
            "scaling.use_gpu: true, but this driver has no CUDA device: own paths train on its CPU"
        )
    return "cuda" if use_gpu and cuda_available else "cpu"
