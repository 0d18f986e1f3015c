"""Tensors as the cpu kernels read them: compact and 64-byte aligned.

TVM's generated code assumes every buffer starts on a 64-byte boundary (it emits aligned
vector loads), and torch's allocator gives every new tensor such an address. A view at an
odd offset (a slice, a row of a larger tensor) or a numpy or mmapped buffer may not be:
read there, the kernel faults. Inputs are therefore copied when they are not ready, and a
buffer a kernel writes in place, which a copy would silently detach, is refused.
"""
from __future__ import annotations

import torch

KERNEL_ALIGNMENT = 64  # bytes


def is_kernel_ready(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.data_ptr() % KERNEL_ALIGNMENT == 0


def kernel_ready(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if contiguous and 64-byte aligned, else an aligned copy."""
    return tensor if is_kernel_ready(tensor) else tensor.contiguous().clone()


def check_kernel_ready(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A tensor a kernel updates in place: it must be ready as it is."""
    if not is_kernel_ready(tensor):
        raise ValueError(f"{name} must be contiguous and {KERNEL_ALIGNMENT}-byte aligned for the cpu kernels, "
                         f"which write it in place (shape {tuple(tensor.shape)}, strides {tensor.stride()}, "
                         f"address offset {tensor.data_ptr() % KERNEL_ALIGNMENT})")
    return tensor
