"""Would the M teachers' trainable top layers run faster as one batched call? Measured for benchmarks.multiteacher.

Finetuning M teachers together, each step runs every teacher's own top layers (82% of a teacher's step; the rest is
shared at best, the bound in multiteacher.md). Their weights differ and so do their inputs (each teacher's own frozen
layer sits below them), so the one way to lower that part is to run the M teachers' layers as batched operations
instead of M calls. Two ways are timed here against the engine's M sequential calls, forward and backward, on one
chunk of titles as the engine encodes it (``engine.chunk_tokens`` tokens, ``data.title_tokens`` per row, a third of
each row padding):

- ``vmap``: the teachers' top layers stacked with ``torch.func.stack_module_state`` and run under ``torch.func.vmap``
  over ``functional_call`` of the same layer code the engine runs;
- ``bmm``: only the six matrix products of each layer (query, key, value, attention output, the two feed-forward
  ones), as one ``torch.bmm`` over stacked [M, out, in] weights against M ``F.linear`` calls: the best a hand-written
  batched layer could gain, since attention, LayerNorm and activations are per teacher either way.

Dropout is off in every variant: the engine's CPU dropout draws its mask on the host (kernels/dropout.py), which
vmap cannot batch; without it every variant does the same arithmetic, and the vmap variant's output is checked
against the sequential one's. Weights are random (the cost does not depend on them), the shapes are the encoder's.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def _median_ms(times: list[float], warmup: int) -> float:
    return 1000.0 * statistics.median(times[warmup:])


def _timed(fn, amp: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = fn()
    out.float().square().mean().backward()
    return time.perf_counter() - t0


class _Top(nn.Module):
    """One teacher's top layers as the engine runs them (BertFamilyBackbone.run_layer)."""

    def __init__(self, backbone, mask: torch.Tensor):
        super().__init__()
        self.backbone, self.mask = backbone, mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        attend = self.backbone._plain_attention(self.mask, False)
        for i in range(self.backbone.freeze_layers, len(self.backbone.layers)):
            h = self.backbone.run_layer(i, h, attend)
        return h


def measure(hf_config, teachers: int, top_layers: int, chunk_tokens: int, title_tokens: int, repeats: int = 7,
            warmup: int = 2) -> dict:
    """Median milliseconds of one forward and backward of M teachers' top layers on one chunk, per variant and
    precision, measured interleaved; the ratios (> 1: the batched variant is slower) pair each batched run with the
    sequential run of its round, and a variant counts as faster only when every round's ratio is below 1."""
    from transformers import BertModel

    from speedyrec.models.backbone import BertFamilyBackbone

    torch.manual_seed(0)
    layers = hf_config.num_hidden_layers
    backbones = []
    for _ in range(teachers):
        bb = BertFamilyBackbone(BertModel(hf_config), 0, layers - top_layers).train()
        for mod in bb.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        backbones.append(bb)
    rows, hidden = max(chunk_tokens // title_tokens, 1), hf_config.hidden_size
    mask = torch.ones(rows, title_tokens, dtype=torch.bool)
    mask[:, (2 * title_tokens) // 3:] = False
    h0 = torch.randn(teachers, rows, title_tokens, hidden)
    tops = [_Top(bb, mask) for bb in backbones]

    def sequential():
        return torch.stack([top(h0[i]) for i, top in enumerate(tops)])

    params, buffers = torch.func.stack_module_state(tops)
    base = copy.deepcopy(tops[0]).to("meta")

    def one(p, b, h):
        return torch.func.functional_call(base, (p, b), (h,))

    def vmapped():
        return torch.func.vmap(one)(params, buffers, h0)

    with torch.no_grad():
        same = torch.allclose(sequential(), vmapped(), atol=1e-4, rtol=1e-4)
    if not same:
        raise AssertionError("the vmap variant does not compute what the sequential layers compute")

    inter = hf_config.intermediate_size
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden), (hidden, inter)]
    weights = [[torch.randn(o, i, requires_grad=True) for o, i in shapes] for _ in range(teachers)]
    stacked = [torch.stack([w[j].detach() for w in weights]).requires_grad_() for j in range(len(shapes))]
    x = {hidden: torch.randn(teachers, rows * title_tokens, hidden), inter: torch.randn(teachers, rows * title_tokens, inter)}

    def linears():
        return torch.stack([sum(F.linear(x[i][m], weights[m][j]).float().sum() for j, (_, i) in enumerate(shapes))
                            for m in range(teachers)])

    def bmm():
        return sum(torch.bmm(x[i], stacked[j].transpose(1, 2)).float().sum() for j, (_, i) in enumerate(shapes))

    out = {"teachers": teachers, "top_layers": top_layers, "rows": rows, "title_tokens": title_tokens,
           "tokens": rows * title_tokens, "repeats": repeats, "warmup": warmup}
    for precision, amp in (("fp32", False), ("bf16", True)):
        times = {k: [] for k in ("sequential", "vmap", "linears", "bmm")}
        for _ in range(warmup + repeats):
            for name, fn in (("sequential", sequential), ("vmap", vmapped), ("linears", linears), ("bmm", bmm)):
                times[name].append(_timed(fn, amp))
        ms = {k: _median_ms(v, warmup) for k, v in times.items()}
        # each batched run against the sequential run of its round: faster only when every round says so
        pairs = {"vmap_over_sequential": ("vmap", "sequential"), "bmm_over_linears": ("bmm", "linears")}
        ratios = {key: [x / y for x, y in zip(times[a][warmup:], times[b][warmup:])] for key, (a, b) in pairs.items()}
        out[precision] = {**{f"{k}_ms": v for k, v in ms.items()},
                          **{key: statistics.median(r) for key, r in ratios.items()},
                          **{f"{key}_repeats": r for key, r in ratios.items()},
                          "faster": [key for key, r in ratios.items() if max(r) < 1.0],
                          # the matrix products' share of the top layers' time, and the most of that time a
                          # batched layer could save: what bmm saves on them
                          "linears_share": ms["linears"] / ms["sequential"],
                          "bmm_saves_at_most": max(ms["linears"] - ms["bmm"], 0.0) / ms["sequential"]}
    out["batched_faster"] = any(out[p]["faster"] for p in ("fp32", "bf16"))
    return out
