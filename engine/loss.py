"""The autoregressive user loss (SpeedyFeed Eq. 5): every prefix of a history predicts its next click.

Given the news table of a batch, the clicks of each sequence are dispatched by index (padding gets a
zero dummy vector, never an encoding); the user encoder returns the user state after every prefix in
one pass; the state before position t (the initial state for t = 0) scores click t against its
negatives, and the cross-entropy of the click is summed over the target positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def dispatch(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table [U, D], rows [...] (-1 = padding) -> [..., D] with zeros at padding."""
    valid = rows >= 0
    out = table[rows.clamp(min=0)]
    return out * valid.unsqueeze(-1).to(out.dtype)


@dataclass
class TargetIndex:
    """The training targets of a [B, L] batch as flat positions b * L + t, worked out on the host with the batch.

    Selecting targets by index is a gather whose size the host knows; selecting them with a boolean mask would make
    the host wait for the device to count them (engine/host_sync.py), once per use, at every step."""

    click: torch.Tensor  # int64 [T]: the position of each target's click, row-major (the order of mask.nonzero())
    state: torch.Tensor  # int64 [T]: the target is scored from the user state before this position

    def __len__(self) -> int:
        return self.click.numel()

    def to(self, device: torch.device) -> "TargetIndex":
        return TargetIndex(self.click.to(device, non_blocking=True), self.state.to(device, non_blocking=True))

    @staticmethod
    def from_host(targets: np.ndarray, state_pos: np.ndarray | None = None) -> "TargetIndex":
        """From host arrays: targets [B, L] bool, state_pos [B, L] (as in :func:`target_scores`; None = before t)."""
        rows, cols = np.nonzero(targets)
        width = targets.shape[1]
        click = rows * width + cols
        state = click if state_pos is None else rows * width + state_pos[rows, cols]
        return TargetIndex(torch.from_numpy(click.astype(np.int64)), torch.from_numpy(state.astype(np.int64)))

    @staticmethod
    def from_mask(targets: torch.Tensor, state_pos: torch.Tensor | None = None) -> "TargetIndex":
        """From a device mask (reads it back: for callers that hold a mask, not for the training step)."""
        device = targets.device
        index = TargetIndex.from_host(targets.cpu().numpy(), None if state_pos is None else state_pos.cpu().numpy())
        return index.to(device)


@dataclass
class TargetScores:
    """What one model says about each training target of a batch (T targets, C = 1 + K candidates)."""

    logits: torch.Tensor  # [T, C] float32: the clicked news first, then its negatives
    user: torch.Tensor  # [T, D]: the user state that scored the target (before its click)
    candidates: torch.Tensor  # [T, C, D]: the candidates' news vectors


def target_scores(table: torch.Tensor, clicks: torch.Tensor, negatives: torch.Tensor,
                  targets: torch.Tensor | TargetIndex, prefix_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  initial_state: torch.Tensor, state_pos: torch.Tensor | None = None) -> TargetScores:
    """Scores of every target position against its negatives.

    table [U, D]; clicks [B, L] rows of table (-1 = padding, right-padded); negatives [B, L, K] rows;
    targets: a :class:`TargetIndex`, or a bool mask [B, L] with ``state_pos`` [B, L] (int64, at most the position
    itself: score the click at t from the state before position state_pos[t] instead of before t, e.g. before the
    first click of its impression; None = before t); ``prefix_states(x [B, L, D], mask [B, L]) -> [B, L, D]`` is the
    user state after positions 0..t; ``initial_state`` [D] is the state of an empty history.
    """
    if not isinstance(targets, TargetIndex):
        targets = TargetIndex.from_mask(targets, state_pos)
    valid = clicks >= 0
    click_vec = dispatch(table, clicks)  # [B, L, D]
    states = prefix_states(click_vec, valid)
    b, length, d = click_vec.shape
    before = torch.cat([initial_state.to(states.dtype).expand(b, 1, d), states[:, :-1]], dim=1)
    user = before.reshape(b * length, d).index_select(0, targets.state)  # [T, D]
    rows = torch.cat([clicks.unsqueeze(-1), negatives], dim=-1).reshape(b * length, 1 + negatives.shape[-1])
    cand = dispatch(table, rows.index_select(0, targets.click))  # [T, C, D]
    logits = torch.einsum("td,tcd->tc", user, cand).float()
    return TargetScores(logits, user, cand)


def click_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [T, C] with the clicked news in column 0 -> per-target cross-entropy [T]."""
    return torch.logsumexp(logits, dim=-1) - logits[:, 0]


def inbatch_logits(table: torch.Tensor, clicks: torch.Tensor, targets: torch.Tensor | TargetIndex,
                   scores: TargetScores) -> torch.Tensor:
    """Each target's click against every news of the batch table that its user did not click.

    The table already holds the batch's news (clicks of every sequence, sampled negatives), so these negatives
    cost no encoding: one [T, U] product. A row the target's own sequence clicks anywhere (context, earlier or
    later targets, the click itself) is masked, so no news the user clicked is scored as a negative. ``targets`` as
    in :func:`target_scores`. Returns logits [T, 1 + U] float32, the click first and masked entries at -inf.
    """
    if not isinstance(targets, TargetIndex):
        targets = TargetIndex.from_mask(targets)
    b, length = clicks.shape
    u = table.shape[0]
    clicked = torch.zeros((b, u + 1), dtype=torch.bool, device=table.device)
    clicked.scatter_(1, clicks + 1, True)  # padding (-1) lands in column 0, which is dropped
    rows = torch.div(targets.click, length, rounding_mode="floor")  # each target's sequence, in the order of scores
    others = (scores.user @ table.t()).float().masked_fill(clicked[:, 1:].index_select(0, rows), float("-inf"))
    return torch.cat([scores.logits[:, :1], others], dim=1)


def autoregressive_loss(table: torch.Tensor, clicks: torch.Tensor, negatives: torch.Tensor,
                        targets: torch.Tensor | TargetIndex,
                        prefix_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        initial_state: torch.Tensor, state_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-click cross-entropy over the target positions (arguments as :func:`target_scores`).
    Returns (loss sum, targets)."""
    scores = target_scores(table, clicks, negatives, targets, prefix_states, initial_state, state_pos)
    return click_cross_entropy(scores.logits).sum(), len(scores.logits)
