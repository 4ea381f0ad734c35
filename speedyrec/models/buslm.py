"""BusLM news encoder (SpeedyFeed): the fields of a news encoded as separate segments joined by a bus.

Each news arrives as S segments ``[CLS] field [SEP]`` of T padded positions (``TokenStore.segments``).
The segments run through the transformer side by side, [N * S, T] rows, with positions restarting at 0
in each. In every layer a segment attends to its own tokens plus the bus, i.e. the current [CLS] state
of the other present segments of its news (keys and values only; see
:mod:`speedyrec.kernels.bus_attention`). Attention costs O(S * T * (T + S)) per news instead of
O((S * T)^2) for the concatenated text, and information still crosses segments through the bus.

Segments are packed by their own lengths: the present segments of all news of a call are sorted by length and
cut into at most ``pack_groups`` chunks of similar width, chosen to pad the least (so a short title is not padded
to a long body's width). Each layer computes the projections chunk by chunk, gathers every segment's [CLS]
key/value into the bus of its news, then attends and runs the feed-forward chunk by chunk. ``pack_groups=None``
keeps the plain layout (every segment padded to the widest), the reference the packed path must equal.

After the last layer, tokens are pooled into one vector per segment (``pool``, the same additive
attention as :class:`~speedyrec.models.recommender.NewsEncoder`), segments into one vector per news
(``segment_pool``), and ``proj`` maps it to the news dimension (SpeedyFeed appendix A, eqs. 11-16).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speedyrec.config import ConfigError
from speedyrec.engine.encode import width_groups
from speedyrec.kernels.bus_attention import bus_attention, bus_attention_rows
from speedyrec.models.backbone import eval_mode
from speedyrec.models.recommender import AdditiveAttention


def pack_segments(token_mask: torch.Tensor, max_groups: int) -> list[tuple[torch.Tensor, int]]:
    """The present segments of ``token_mask`` [N, S, T] (rows of the [N * S] segments), sorted by width and cut
    into at most ``max_groups`` groups with the least padding: (row indices, width) per group, narrowest first."""
    n, s, t = token_mask.shape
    rows_mask = token_mask.reshape(n * s, t)
    # a segment's width: its last real position + 1 (segments are laid out from position 0)
    ends = (rows_mask * torch.arange(1, t + 1, device=rows_mask.device)).amax(dim=-1).cpu().numpy()
    order = np.argsort(ends, kind="stable")
    order = order[ends[order] > 0]
    dev = token_mask.device
    return [(torch.from_numpy(order[c]).to(dev), int(ends[order[c]].max())) for c in width_groups(ends[order], max_groups)]


def packed_tokens(mask: torch.Tensor, max_groups: int | None) -> int:
    """Token positions (real and padding) BusLM's layers process for segments ``mask`` [N, S, T]: the packed
    groups' sizes, or the whole padded layout when ``max_groups`` is None."""
    if max_groups is None:
        return mask.numel()
    return sum(len(rows) * width for rows, width in pack_segments(mask.bool(), max_groups))


class BusLMNewsEncoder(nn.Module):
    """Segments [N, S, T] -> news vectors [N, D] through a bus-connected BERT-family backbone.

    ``backbone`` must provide ``embed``, ``run_layer``, ``layers``, ``heads``, ``hidden_size`` and
    ``freeze_layers`` (:class:`~speedyrec.models.backbone.BertFamilyBackbone` does). Its first
    ``freeze_layers`` layers and its embeddings run without autograd and in eval mode; their output
    [N, S, T, H] is :meth:`frozen_forward` and can be passed back as ``start_states``.
    """

    def __init__(self, backbone: nn.Module, dim: int, attention_dim: int, pack_groups: int | None = 8):
        super().__init__()
        self.pack_groups = pack_groups
        missing = [a for a in ("embed", "run_layer", "layers", "heads", "hidden_size", "freeze_layers")
                   if not hasattr(backbone, a)]
        if missing:
            raise ConfigError(f"engine.buslm needs a BERT-family encoder run layer by layer; "
                              f"{type(backbone).__name__} lacks {', '.join(missing)}")
        self.backbone = backbone
        h = backbone.hidden_size
        self.pool = AdditiveAttention(h, attention_dim)
        self.segment_pool = AdditiveAttention(h, attention_dim)
        self.proj = nn.Linear(h, dim)

    @classmethod
    def from_news_encoder(cls, news_encoder: nn.Module, pack_groups: int | None = 8) -> "BusLMNewsEncoder":
        """A BusLM encoder sharing ``news_encoder``'s backbone, token pooling and projection (the same
        module objects, hence the same parameters); only ``segment_pool`` is new (freshly initialised,
        on the device and dtype of the shared projection)."""
        proj, pool = news_encoder.proj, news_encoder.pool
        enc = cls(news_encoder.backbone, proj.out_features, pool.proj.out_features, pack_groups)
        enc.pool = pool
        enc.proj = proj
        enc.segment_pool.to(device=proj.weight.device, dtype=proj.weight.dtype)
        return enc

    # ------------------------------------------------------------------ transformer

    def _attend(self, n: int, s: int, t: int, token_mask: torch.Tensor, present: torch.Tensor):
        heads = self.backbone.heads

        def attend(q, k, v, p):
            h = q.shape[-1]
            out = bus_attention(q.view(n, s, t, h), k.view(n, s, t, h), v.view(n, s, t, h),
                                token_mask, present, heads, dropout_p=p)
            return out.view(n * s, t, h)

        return attend

    def _embed(self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor | None) -> torch.Tensor:
        n, s, t = input_ids.shape
        extra = None
        if extra_embeddings is not None:
            extra = extra_embeddings.reshape(n * s, t, extra_embeddings.shape[-1])
        return self.backbone.embed(input_ids.reshape(n * s, t), extra=extra)  # positions restart per segment

    def frozen_forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings and the ``backbone.freeze_layers`` frozen layers, with the bus, without autograd and
        in eval mode (the train/eval flags are restored afterwards) -> token states [N, S, T, H].

        A pure function of the tokens, so it may be cached and passed back to :meth:`forward` as ``start_states``.
        """
        return self.frozen_layers(self.frozen_embed(input_ids), mask, 0, self.backbone.freeze_layers)

    def frozen_embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of segments [N, S, T] without autograd and in eval mode -> [N, S, T, H]."""
        n, s, t = input_ids.shape
        modules = [m for m in (getattr(self.backbone, "embeddings", None),) if m is not None]
        with torch.no_grad(), eval_mode(*modules):
            h = self._embed(input_ids, None)
        return h.view(n, s, t, h.shape[-1])

    def frozen_layers(self, h: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Frozen layers start..end-1, with the bus, on token states h [N, S, T, H] of segments ``mask`` [N, S, T],
        without autograd and in eval mode -> [N, S, T, H] (what a stack of teachers shares and caches)."""
        bb = self.backbone
        assert end <= bb.freeze_layers, "only frozen layers run without autograd"
        n, s, t, hidden = h.shape
        token_mask = mask.bool()
        with torch.no_grad(), eval_mode(*bb.layers[start:end]):
            h = self._layers(h.reshape(n * s, t, hidden), token_mask, token_mask.any(dim=-1), range(start, end))
        return h.view(n, s, t, hidden)

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor,
                      extra_embeddings: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The embeddings' output and every layer's output, with the bus, [N, S, T, H] each (L + 1 tensors), with
        autograd where the layers train (what NewsBERT's layer-to-layer distillation compares). ``extra_embeddings``
        join as in :meth:`token_states`, so the last state is what it returns. Positions outside a segment's
        tokens are not defined (zeros where packed): compare them under the mask."""
        bb = self.backbone
        n, s, t = input_ids.shape
        frozen = bb.freeze_layers
        states = [self.frozen_embed(input_ids) if frozen > 0
                  else self._embed(input_ids, extra_embeddings).view(n, s, t, bb.hidden_size)]
        for i in range(frozen):
            states.append(self.frozen_layers(states[-1], mask, i, i + 1))
        if frozen > 0 and extra_embeddings is not None:
            states[-1] = states[-1] + extra_embeddings
        token_mask = mask.bool()
        present = token_mask.any(dim=-1)
        for i in range(frozen, len(bb.layers)):
            h = self._layers(states[-1].reshape(n * s, t, bb.hidden_size), token_mask, present, range(i, i + 1))
            states.append(h.view(n, s, t, bb.hidden_size))
        return states

    def token_states(self, input_ids: torch.Tensor, mask: torch.Tensor, extra_embeddings: torch.Tensor | None = None,
                     start_states: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer token states [N, S, T, H] of the segments ``input_ids``/``mask`` [N, S, T].

        ``extra_embeddings`` [N, S, T, H] (the frequency embedding) join where training starts, so they always
        train: added to the token embeddings before their LayerNorm when nothing is frozen, else to the frozen
        layers' output. ``start_states`` [N, S, T, H] is :meth:`frozen_forward`'s output for the same input; it
        replaces running the embeddings and frozen layers. Giving it without frozen layers is an error.
        """
        bb = self.backbone
        if input_ids.dim() != 3 or mask.shape != input_ids.shape:
            raise ValueError(f"BusLM expects input_ids and mask of one shape [N, S, T]; got {tuple(input_ids.shape)} "
                             f"and {tuple(mask.shape)}")
        n, s, t = input_ids.shape
        hidden = bb.hidden_size
        token_mask = mask.bool()
        present = token_mask.any(dim=-1)
        if bb.freeze_layers > 0:
            if start_states is None:
                start_states = self.frozen_forward(input_ids, token_mask)
            elif tuple(start_states.shape) != (n, s, t, hidden):
                raise ValueError(f"start_states must be [N, S, T, H] = {(n, s, t, hidden)}; got {tuple(start_states.shape)}")
            h = start_states.reshape(n * s, t, hidden)
            if extra_embeddings is not None:
                h = h + extra_embeddings.reshape(n * s, t, hidden)
        else:
            if start_states is not None:
                raise ValueError("start_states given but the backbone has no frozen layers (model.freeze_layers=0)")
            h = self._embed(input_ids, extra_embeddings)
        h = self._layers(h, token_mask, present, range(bb.freeze_layers, len(bb.layers)))
        return h.view(n, s, t, hidden)

    # ------------------------------------------------------------------ packing

    def padded_tokens(self, mask: torch.Tensor) -> int:
        """Token positions (real and padding) the transformer layers process for segments ``mask`` [N, S, T]."""
        return packed_tokens(mask, self.pack_groups)

    def _layers(self, h: torch.Tensor, token_mask: torch.Tensor, present: torch.Tensor, layers: range) -> torch.Tensor:
        """Run ``layers`` on segment rows h [N * S, T, H] -> [N * S, T, H] (zeros at absent segments when packed)."""
        bb = self.backbone
        n, s, t = token_mask.shape
        if self.pack_groups is None:
            attend = self._attend(n, s, t, token_mask, present)
            for i in layers:
                h = bb.run_layer(i, h, attend)
            return h
        if len(layers) == 0:
            return h
        chunks = pack_segments(token_mask, self.pack_groups)
        rows_mask = token_mask.reshape(n * s, t)
        all_rows = torch.cat([rows for rows, _ in chunks])
        hs = [h[rows, :w] for rows, w in chunks]
        masks = [rows_mask[rows, :w] for rows, w in chunks]
        news = [rows // s for rows, _ in chunks]
        not_self = ~torch.eye(s, dtype=torch.bool, device=h.device)
        bus_masks = [present[nw] & not_self[rows % s] for nw, (rows, _) in zip(news, chunks)]
        hidden = h.shape[-1]
        for i in layers:
            layer = bb.layers[i]
            sa = layer.attention.self
            p = sa.dropout.p if (bb.training and i >= bb.freeze_layers) else 0.0
            q, k, v = [sa.query(x) for x in hs], [sa.key(x) for x in hs], [sa.value(x) for x in hs]
            bus_k = k[0].new_zeros((n * s, hidden)).index_copy(0, all_rows, torch.cat([x[:, 0] for x in k]))
            bus_v = v[0].new_zeros((n * s, hidden)).index_copy(0, all_rows, torch.cat([x[:, 0] for x in v]))
            bus_k, bus_v = bus_k.view(n, s, hidden), bus_v.view(n, s, hidden)
            out = []
            for c, x in enumerate(hs):
                ctx = bus_attention_rows(q[c], k[c], v[c], masks[c], bus_k[news[c]], bus_v[news[c]], bus_masks[c],
                                         bb.heads, dropout_p=p)
                x = layer.attention.output(ctx, x)
                out.append(layer.output(layer.intermediate(x), x))
            hs = out
        packed = torch.cat([F.pad(x, (0, 0, 0, t - x.shape[1])) for x in hs])
        return packed.new_zeros((n * s, t, hidden)).index_copy(0, all_rows, packed)

    # ------------------------------------------------------------------ pooling

    def segment_vectors(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [N, S, T, H] -> one vector per segment [N, S, H] (zeros for absent segments)."""
        n, s, t, h = states.shape
        return self.pool(states.reshape(n * s, t, h), mask.reshape(n * s, t).bool()).view(n, s, h)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, extra_embeddings: torch.Tensor | None = None,
                start_states: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, mask [N, S, T] (every news with at least one present segment) -> news vectors [N, D].

        See :meth:`token_states` for ``extra_embeddings`` and ``start_states``.
        """
        return self.pool_states(self.token_states(input_ids, mask, extra_embeddings, start_states), mask)

    def pool_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-layer token states [N, S, T, H] of segments ``mask`` [N, S, T] -> news vectors [N, D]."""
        segments = self.segment_vectors(states, mask)
        return self.proj(self.segment_pool(segments, mask.bool().any(dim=-1)))
