"""M news encoders that share their frozen lower layers, run as one.

Tiny-NewsRec's teachers are copies of one PLM: post-training trains the top 3 layers and finetuning the
top 2, so everything below is the same weights in every teacher. :class:`SharedPrefixStack` finds that
common frozen prefix (embeddings and the first ``shared_depth`` layers, compared weight by weight),
computes it once per news for all M encoders, runs each encoder's own frozen layers on top (cached per
encoder), and then only each encoder's trainable layers. With the caches on, a news pays for the shared
prefix once per run, for each encoder's own frozen layers once per run, and for the trainable layers at
every step, exactly as one encoder alone would.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from speedyrec.models.frozen_prefix import FrozenCachePlace, FrozenPrefixCache
from speedyrec.models.recommender import frequency_embeddings


def _same_weights(modules: list[nn.Module]) -> bool:
    states = [m.state_dict() for m in modules]
    first = states[0]
    return all(s.keys() == first.keys() and all(torch.equal(s[k], first[k]) for k in first) for s in states[1:])


def shared_frozen_depth(backbones: list[nn.Module]) -> int | None:
    """How many leading frozen layers (on top of frozen embeddings) all backbones share weight for weight;
    None when not even the embeddings are shared (different weights, trainable embeddings, or a backbone
    that is not run layer by layer)."""
    needed = ("frozen_embed", "frozen_layers", "freeze_layers", "layers", "embeddings")
    if not all(all(hasattr(b, a) for a in needed) for b in backbones):
        return None
    if min(b.freeze_layers for b in backbones) == 0:
        return None
    if len({(b.hidden_size, b.heads, b.position_offset) for b in backbones}) > 1:
        return None
    if not _same_weights([b.embeddings for b in backbones]):
        return None
    depth = 0
    while depth < min(b.freeze_layers for b in backbones) and _same_weights([b.layers[depth] for b in backbones]):
        depth += 1
    return depth


class SharedPrefixStack(nn.Module):
    """M news encoders (same output size D, same kind: one sequence [R, T] or BusLM segments [R, S, T]) encoding the
    same news: ids, mask [R, T] (or [R, S, T]) -> vectors [R, M, D].

    ``frequencies``: each encoder's frequency embedding of refined text (None where it has none); it joins each
    encoder where its training started (after its frozen layers), as in the encoder's own forward."""

    def __init__(self, encoders: list[nn.Module], frequencies: list[nn.Module | None] | None = None):
        super().__init__()
        dims = {e.proj.out_features for e in encoders}
        if len(dims) != 1:
            raise ValueError(f"the stacked encoders must share one output size; got {sorted(dims)}")
        if len({type(e) for e in encoders}) != 1:
            raise ValueError("the stacked encoders must read news in one layout (all BusLM, or none)")
        self.encoders = nn.ModuleList(encoders)
        # not registered: the recommenders own them (and move them); they hold no dropout
        self.frequencies = list(frequencies) if frequencies is not None else [None] * len(encoders)
        assert len(self.frequencies) == len(encoders)
        self.dim = dims.pop()
        self.shared_depth = shared_frozen_depth([e.backbone for e in encoders])
        self.shared_cache: FrozenPrefixCache | None = None
        self.own_caches: list[FrozenPrefixCache | None] = [None] * len(encoders)

    def __len__(self) -> int:
        return len(self.encoders)

    def own_frozen(self, i: int) -> int:
        """Frozen layers of encoder i above the shared prefix (run and cached per encoder)."""
        bb = self.encoders[i].backbone
        return getattr(bb, "freeze_layers", 0) - (self.shared_depth or 0)

    def enable_caches(self, real_tokens: np.ndarray, place: FrozenCachePlace, prefix: str) -> None:
        """The node's caches (at ``place``, names from ``prefix``) of the shared prefix and of each encoder's own
        frozen layers, for news whose real token counts in the encoder layout are ``real_tokens`` [num_news]."""
        hidden = self.encoders[0].backbone.hidden_size
        if self.shared_depth is not None:
            self.shared_cache = place.open(real_tokens, hidden, f"{prefix}_shared_prefix")
        for i in range(len(self)):
            if self.own_frozen(i) > 0:
                self.own_caches[i] = place.open(real_tokens, hidden, f"{prefix}_frozen_{i}")

    def close_caches(self) -> None:
        for c in [self.shared_cache, *self.own_caches]:
            if c is not None:
                c.close()
        self.shared_cache, self.own_caches = None, [None] * len(self)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, news: np.ndarray | None = None,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, mask [R, T] (BusLM: [R, S, T]) of the news ``news`` [R] (their ids, for the caches; None: no
        caching); ``counts``: the refined tokens' word counts, same shape (None: raw text) -> news vectors [R, M, D]."""
        def rows(sel) -> torch.Tensor:
            return torch.as_tensor(sel, device=input_ids.device)

        def cached(cache, compute):
            if cache is None or news is None:
                return compute(np.arange(len(input_ids)))
            return cache.start_states(news, mask, compute)

        base = None
        s = self.shared_depth
        if s is not None:
            enc0 = self.encoders[0]
            base = cached(self.shared_cache, lambda sel: enc0.frozen_layers(
                enc0.frozen_embed(input_ids[rows(sel)]), mask[rows(sel)], 0, s))
        out = []
        for i, enc in enumerate(self.encoders):
            start = base
            if self.own_frozen(i) > 0:
                if base is None:
                    compute = lambda sel, enc=enc: enc.frozen_forward(input_ids[rows(sel)], mask[rows(sel)])
                else:
                    compute = lambda sel, enc=enc: enc.frozen_layers(base[rows(sel)], mask[rows(sel)], s,
                                                                     enc.backbone.freeze_layers)
                start = cached(self.own_caches[i], compute)
            extra = frequency_embeddings(self.frequencies[i], counts)
            out.append(enc(input_ids, mask, extra_embeddings=extra, start_states=start))
        return torch.stack(out, dim=1)
