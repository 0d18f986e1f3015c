"""torch's intra-op threads, set for a while."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_torch_thread():
    """torch runs its ops on one thread inside the block, and on as many as before after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
