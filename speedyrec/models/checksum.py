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


def news_checksum(model: nn.Module) -> str:
    """What a news recommender's news vectors are a function of: its news encoder's weights and, with refined text,
    its frequency embedding (the checksum of the news encoder alone when it has none)."""
    state = dict(model.news_encoder.state_dict())
    frequency = getattr(model, "frequency", None)
    if frequency is not None:
        state.update({f"frequency.{k}": v for k, v in frequency.state_dict().items()})
    return weights_checksum(state)
