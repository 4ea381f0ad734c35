"""Fingerprints of model weights: which weights a model really holds, independent of how they were loaded."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_checksum(weights: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (a state dict's, or a module's)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
