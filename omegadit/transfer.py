"""Host-to-device copies that do not wait for the GPU.

A copy from ordinary (pageable) host memory, or a blocking one from pinned memory, makes the host wait until the
GPU has finished all the work queued before it. In a training loop that is a sync per step: the host cannot run
ahead to prepare the next step while the GPU computes this one.
"""
import torch


def to_device(tensor: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """`tensor` on `device` (and in `dtype`), without blocking the host: a CPU tensor bound for a GPU is pinned
    first (a no-op for the DataLoader's pinned batches) and copied asynchronously. Same values as `tensor.to`."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)
