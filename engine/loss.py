"""The autoregressive user loss (SpeedyFeed Eq. 5): every prefix of a history predicts its next click.

Given the news table of a batch, the clicks of each sequence are dispatched by index (padding gets a
zero dummy vector, never an encoding); the user encoder returns the user state after every prefix in
one pass; the state before position t (the initial state for t = 0) scores click t against its
negatives, and the cross-entropy of the click is summed over the target positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def dispatch(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table [U, D], rows [...] (-1 = padding) -> [..., D] with zeros at padding."""
    valid = rows >= 0
    out = table[rows.clamp(min=0)]
    return out * valid.unsqueeze(-1).to(out.dtype)


@dataclass
class TargetScores:
    """What one model says about each training target of a batch (T targets, C = 1 + K candidates)."""

    logits: torch.Tensor  # [T, C] float32: the clicked news first, then its negatives
    user: torch.Tensor  # [T, D]: the user state that scored the target (before its click)
    candidates: torch.Tensor  # [T, C, D]: the candidates' news vectors


def target_scores(table: torch.Tensor, clicks: torch.Tensor, negatives: torch.Tensor, targets: torch.Tensor,
                  prefix_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  initial_state: torch.Tensor, state_pos: torch.Tensor | None = None) -> TargetScores:
    """Scores of every target position against its negatives.

    table [U, D]; clicks [B, L] rows of table (-1 = padding, right-padded); negatives [B, L, K] rows;
    targets [B, L] bool; ``prefix_states(x [B, L, D], mask [B, L]) -> [B, L, D]`` is the user state after
    positions 0..t; ``initial_state`` [D] is the state of an empty history. ``state_pos`` [B, L] (int64, at
    most the position itself): score the click at t from the state before position state_pos[t] instead
    of before t, e.g. before the first click of its impression; None = before t.
    """
    valid = clicks >= 0
    click_vec = dispatch(table, clicks)  # [B, L, D]
    states = prefix_states(click_vec, valid)
    b, _, d = click_vec.shape
    before = torch.cat([initial_state.to(states.dtype).expand(b, 1, d), states[:, :-1]], dim=1)
    cand = torch.cat([click_vec.unsqueeze(2), dispatch(table, negatives)], dim=2)[targets]  # [T, C, D]
    if state_pos is None:
        user = before[targets]  # [T, D]
    else:
        rows, cols = targets.nonzero(as_tuple=True)  # row-major, the order of before[targets]
        user = before[rows, state_pos[rows, cols]]
    logits = torch.einsum("td,tcd->tc", user, cand).float()
    return TargetScores(logits, user, cand)


def click_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [T, C] with the clicked news in column 0 -> per-target cross-entropy [T]."""
    return torch.logsumexp(logits, dim=-1) - logits[:, 0]


def inbatch_logits(table: torch.Tensor, clicks: torch.Tensor, targets: torch.Tensor, scores: TargetScores) -> torch.Tensor:
    """Each target's click against every news of the batch table that its user did not click.

    The table already holds the batch's news (clicks of every sequence, sampled negatives), so these negatives
    cost no encoding: one [T, U] product. A row the target's own sequence clicks anywhere (context, earlier or
    later targets, the click itself) is masked, so no news the user clicked is scored as a negative. Returns
    logits [T, 1 + U] float32, the click first and masked entries at -inf.
    """
    b, u = clicks.shape[0], table.shape[0]
    clicked = torch.zeros((b, u), dtype=torch.bool, device=table.device)
    bi, li = (clicks >= 0).nonzero(as_tuple=True)
    clicked[bi, clicks[bi, li]] = True
    rows = targets.nonzero(as_tuple=True)[0]  # each target's sequence, in the order of scores' rows
    others = (scores.user @ table.t()).float().masked_fill(clicked[rows], float("-inf"))
    return torch.cat([scores.logits[:, :1], others], dim=1)


def autoregressive_loss(table: torch.Tensor, clicks: torch.Tensor, negatives: torch.Tensor, targets: torch.Tensor,
                        prefix_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        initial_state: torch.Tensor, state_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-click cross-entropy over the target positions (arguments as :func:`target_scores`).
    Returns (loss sum, targets)."""
    scores = target_scores(table, clicks, negatives, targets, prefix_states, initial_state, state_pos)
    return click_cross_entropy(scores.logits).sum(), int(targets.sum())
