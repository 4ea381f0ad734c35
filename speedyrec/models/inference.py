"""A trained recommender as a server runs it: float32, bf16, or int8 (dynamic quantisation of the transformer).

``inference_model(model, precision)`` gives the model to run and the autocast setting to run it under; the same
function serves the speed measurement (benchmarks.efficiency) and the dev AUC at that precision
(``evaluate_models(..., amp=amp)``), so both measure one model.

- ``fp32``: the model as trained.
- ``bf16``: a copy whose transformer weights are bf16, run under bf16 autocast (poolings, projections and the
  user encoder's linear maps in bf16 too, their parameters kept float32); outputs are float32 as evaluation casts them.
  Fast only where the CPU computes bf16 natively (``speedyrec.engine.precision.native_bf16``).
- ``int8``: a copy whose transformer layers' linear maps (query, key, value, attention output, intermediate and
  output: every ``nn.Linear`` of the layers, 97% of a layer's parameters) are ``torch.ao``'s dynamically
  quantised linears: int8 weights per output channel, activations quantised per batch on the fly (uint8, one
  scale per batch), int32 accumulation. Where the CPU has VNNI the activations use all 8 bits (torch's module
  keeps 7, ``reduce_range``, against an int16 overflow of pre-VNNI kernels): a pretrained BERT's activations
  have outlier channels (MiniLM's FFN inputs reach 25-28 against a spread of 0.3-0.7), and the 8th bit halves
  the news vectors' error (2-layer MiniLM: 20% -> 10% of a vector's norm at worst). The embeddings, LayerNorms,
  the attention itself, the news pooling and projection and the user encoder stay float32 (the poolings read
  their projection's weight directly, which a quantised linear does not expose as a tensor).
"""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8")


def inference_model(model: nn.Module, precision: str) -> tuple[nn.Module, str]:
    """(model to run in eval mode, ``amp`` to run it under: "bf16" or "off") for a NewsRecommender (or anything
    with ``news_encoder.backbone.layers``). ``model``'s modules and weights are never changed (fp32 returns it, put in
    eval mode); bf16 and int8 run copies."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model.eval(), "off"
    served = copy.deepcopy(model).eval()
    for p in served.parameters():
        p.requires_grad_(False)
    backbone = served.news_encoder.backbone
    if precision == "bf16":
        backbone.to(torch.bfloat16)
        return served, "bf16"
    quantize_linears(backbone.layers)
    return served, "off"


def quantize_linears(module: nn.Module, full_range: bool | None = None) -> nn.Module:
    """Every ``nn.Linear`` inside ``module`` replaced in place by torch.ao's dynamically quantised int8 linear
    (per-channel weights); ``full_range``: activations on 8 bits instead of 7 (None: where the CPU has VNNI).
    Returns ``module``."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; its dynamic linear is what runs int8 on CPUs in
        # eager mode here (torchao's needs torch.compile for its speed)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    if full_range is None:
        full_range = cpu_has_vnni()
    if full_range:
        for m in module.modules():
            if type(m) is DynamicLinear:
                m.__class__ = full_range_linear_class()  # same packed weights, only forward differs
    return module


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies uint8 by int8 into int32 directly (VNNI or AMX-INT8): no int16 intermediate
    that 8-bit activations could overflow."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.partition(":")[0].strip() == "flags"
             for f in line.partition(":")[2].split()}
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


@functools.cache
def full_range_linear_class():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeDynamicLinear(DynamicLinear):
        """torch.ao's dynamic int8 linear with 8-bit activations (``reduce_range=False``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                      reduce_range=False).to(x.dtype)

    return FullRangeDynamicLinear


def quantized_linears(module: nn.Module) -> int:
    """How many of ``module``'s submodules are int8 dynamically quantised linears."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in module.modules())  # FullRangeDynamicLinear included


def parameter_counts(model: nn.Module) -> dict:
    """Parameters of a NewsRecommender: ``total`` (what Tiny-NewsRec's Table 3 counts as model size: embeddings,
    transformer layers, pooling, projection, user encoder), ``embeddings`` (the transformer's token, position and
    token-type tables and their LayerNorm) and ``without_embeddings``. Counted on the float model (a quantised
    copy holds the same numbers as packed int8)."""
    total = sum(p.numel() for p in model.parameters())
    emb = getattr(model.news_encoder.backbone, "embeddings", None)
    embeddings = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
    return {"total": total, "embeddings": embeddings, "without_embeddings": total - embeddings}
