"""omegadit.transfer.to_device: the values of Tensor.to, and on a GPU no wait for the GPU's queued work."""
import pytest
import torch

from omegadit.conditioners import ClassConditioner
from omegadit.transfer import to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host-device syncs")


def test_to_device_gives_the_values_and_dtype_of_tensor_to():
    x = torch.arange(12).view(3, 4)
    for dtype in (None, torch.float32, torch.long):
        moved = to_device(x, "cpu", dtype)
        assert moved.dtype == (dtype or x.dtype)
        assert torch.equal(moved, x.to(dtype or x.dtype))


def _no_sync(function):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return function()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_pageable_copy_to_the_gpu_waits_and_to_device_does_not():
    x = torch.arange(4096)
    with pytest.raises(RuntimeError, match="synchroniz"):
        _no_sync(lambda: x.to("cuda"))
    moved = _no_sync(lambda: to_device(x, "cuda", torch.float32))
    assert moved.device.type == "cuda" and moved.dtype == torch.float32
    assert torch.equal(moved.cpu(), x.float())


@cuda
def test_class_labels_reach_the_gpu_without_a_sync():
    labels = torch.tensor([0, 3, 1, 2])
    moved = _no_sync(lambda: ClassConditioner(4)(labels, "cuda"))
    assert moved.dtype == torch.long and torch.equal(moved.cpu(), labels)
