"""The PLM news recommender (PLM-NR, as in Tiny-NewsRec): news encoder, user encoder, dot-product score."""
from __future__ import annotations

import math

import torch
from torch import nn

from speedyrec.kernels.pooling import additive_attention_pool, causal_additive_attention_pool


class AdditiveAttention(nn.Module):
    """Learned-query attention pooling over the items of a sequence."""

    def __init__(self, in_dim: int, attention_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, attention_dim)
        self.query = nn.Parameter(torch.empty(attention_dim).uniform_(-1 / math.sqrt(attention_dim), 1 / math.sqrt(attention_dim)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, H], mask [B, L] -> [B, H]; all-masked rows give zeros."""
        return additive_attention_pool(x, mask, self.proj.weight, self.proj.bias, self.query)


def frequency_embeddings(frequency: nn.Embedding | None, counts: torch.Tensor | None) -> torch.Tensor | None:
    """The frequency embedding of refined tokens: word counts [..., T] -> [..., T, H]; None without a frequency
    embedding (engine.refine off) or without counts (raw text)."""
    if frequency is None or counts is None:
        return None
    return frequency(counts.clamp(max=frequency.num_embeddings - 1))


class NewsEncoder(nn.Module):
    """Backbone token states -> attention pooling -> linear layer to ``dim``."""

    def __init__(self, backbone: nn.Module, dim: int, attention_dim: int):
        super().__init__()
        self.backbone = backbone
        h = backbone.hidden_size
        self.pool = AdditiveAttention(h, attention_dim)
        self.proj = nn.Linear(h, dim)

    def frozen_forward(self, input_ids: torch.Tensor, mask: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """The frozen layers' output [N, T, H] (see BertFamilyBackbone.frozen_forward)."""
        if dense is None:
            return self.backbone.frozen_forward(input_ids, mask)
        return self.backbone.frozen_forward(input_ids, mask, dense)

    def frozen_embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen embeddings' output [N, T, H]."""
        return self.backbone.frozen_embed(input_ids)

    def frozen_layers(self, h: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Frozen layers start..end-1 on token states h [N, T, H] -> [N, T, H]."""
        return self.backbone.frozen_layers(h, mask, start, end)

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor,
                      extra_embeddings: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The embeddings' output and every layer's, [N, T, H] each (see BertFamilyBackbone.hidden_states)."""
        return self.backbone.hidden_states(input_ids, mask, extra=extra_embeddings)

    def pool_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-layer token states [N, T, H] -> news vectors [N, D]."""
        return self.proj(self.pool(states, mask))

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, extra_embeddings: torch.Tensor | None = None,
                start_states: torch.Tensor | None = None, dense: bool | None = None) -> torch.Tensor:
        """input_ids, mask [N, T] -> news vectors [N, D].

        ``extra_embeddings`` [N, T, H] (the frequency embedding of refined text) join at the first trained layer
        (see BertFamilyBackbone.forward); ``start_states`` [N, T, H] is the frozen layers' output when known already;
        ``dense``: whether every row is all real tokens, when the caller knows (see BertFamilyBackbone.forward).
        """
        if extra_embeddings is None and start_states is None and dense is None:
            states = self.backbone(input_ids, mask)
        else:
            states = self.backbone(input_ids, mask, start_states=start_states, extra=extra_embeddings, dense=dense)
        return self.pool_states(states, mask)


class UserEncoder(nn.Module):
    """Attention pooling over the history's news vectors; a learned vector stands for an empty history."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.pool = AdditiveAttention(dim, attention_dim)
        self.empty = nn.Parameter(torch.zeros(dim))

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """history [B, L, D], mask [B, L] -> user vectors [B, D]."""
        pooled = self.pool(history, mask)
        empty = ~mask.any(dim=1, keepdim=True)
        return torch.where(empty, self.empty.to(pooled.dtype).expand_as(pooled), pooled)

    def prefix_states(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user vector after every prefix, in one pass: history [B, L, D], mask [B, L] -> [B, L, D].

        Position t equals ``forward(history[:, :t+1], mask[:, :t+1])``, so the last one is what evaluation uses.
        """
        p = self.pool
        states = causal_additive_attention_pool(history, mask, p.proj.weight, p.proj.bias, p.query)
        seen = mask.cumsum(dim=1) > 0
        return torch.where(seen.unsqueeze(-1), states, self.empty.to(states.dtype).expand_as(states))


MAX_WORD_COUNT = 15  # frequency embedding: counts 1..15 (capped), 0 for specials and padding


class NewsRecommender(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, attention_dim: int, frequency_embedding: bool = False):
        super().__init__()
        self.news_encoder = NewsEncoder(backbone, dim, attention_dim)
        self.user_encoder = UserEncoder(dim, attention_dim)
        self.frequency = None
        if frequency_embedding:  # SpeedyFeed's refined text: a word's count, added to its tokens' embeddings
            self.frequency = nn.Embedding(MAX_WORD_COUNT + 1, backbone.hidden_size, padding_idx=0)
            nn.init.zeros_(self.frequency.weight)  # starts as the pretrained encoder

    @staticmethod
    def score(user: torch.Tensor, news: torch.Tensor) -> torch.Tensor:
        """user [B, D], news [B, C, D] -> click scores [B, C]."""
        return torch.einsum("bd,bcd->bc", user, news)

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
        """The transformer at ``encoder_lr``, everything else (poolings, projections, user encoder) at ``lr``."""
        backbone = [p for p in self.news_encoder.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.news_encoder.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if backbone:
            groups.append({"params": backbone, "lr": encoder_lr, "weight_decay": weight_decay})
        return groups
