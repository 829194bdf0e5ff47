"""Device and precision choices, tested on a CPU for every device they describe."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.device import autocast_context, check_gpu_request, select_precision


@pytest.mark.parametrize(
    ("precision", "device", "bf16_supported", "expected"),
    [
        ("auto", "cpu", False, "fp32"),
        ("auto", "cpu", True, "fp32"),
        ("auto", "cuda", False, "fp32"),
        ("auto", "cuda", True, "bf16"),
        ("fp32", "cpu", False, "fp32"),
        ("fp32", "cuda", True, "fp32"),
        ("bf16", "cuda", True, "bf16"),
    ],
)
def test_select_precision(precision, device, bf16_supported, expected):
    assert select_precision(precision, device, bf16_supported) == expected


@pytest.mark.parametrize(
    ("device", "bf16_supported"), [("cpu", False), ("cpu", True), ("cuda", False)]
)
def test_explicit_bf16_without_support_raises(device, bf16_supported):
    with pytest.raises(ValueError) as info:
        select_precision("bf16", device, bf16_supported)
    message = str(info.value)
    assert message.startswith("train.precision: bf16 needs a CUDA device with bf16 support")
    assert repr(device) in message
    assert "'auto' or 'fp32'" in message


def test_gpu_request_without_gpus_raises():
    with pytest.raises(
        ValueError, match=r"^scaling.use_gpu: true, but the Ray cluster has no GPUs"
    ):
        check_gpu_request(use_gpu=True, cuda_available=False, cluster_gpus=0)


@pytest.mark.parametrize(
    ("use_gpu", "cuda_available", "cluster_gpus"),
    [(False, False, 0), (True, True, 0), (True, False, 2), (False, True, 8)],
)
def test_gpu_request_that_can_be_met_passes(use_gpu, cuda_available, cluster_gpus):
    assert check_gpu_request(use_gpu, cuda_available, cluster_gpus) is None


def test_autocast_context():
    x = torch.randn(4, 4)
    with autocast_context("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_context("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
