"""Inference at fp32, bf16 and int8 (speedyrec.models.inference) and benchmarks.efficiency's tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from speedyrec.engine.distributed import DistInfo
from speedyrec.eval.evaluate import encode_news
from speedyrec.models.backbone import BertFamilyBackbone, random_bert
from speedyrec.models.inference import inference_model, parameter_counts, quantized_linears
from speedyrec.models.news_inputs import NewsInputs, NewsTokens
from speedyrec.models.recommender import NewsRecommender

SHAPE = dict(hidden=32, layers=2, heads=2, intermediate=64)


def _model(seed=0):
    torch.manual_seed(seed)
    return NewsRecommender(BertFamilyBackbone(random_bert(SHAPE, vocab_size=100, pad_id=0)), dim=16,
                           attention_dim=8).eval()


class _Titles(NewsInputs):
    """Fixed token rows standing in for the token store: encode_news reads them as it reads the store's."""

    def __init__(self, n=24, t=12, seed=0):
        super().__init__(store=None)
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, t), generator=g)
        lengths = torch.randint(3, t + 1, (n,), generator=g)
        self.mask = torch.arange(t)[None, :] < lengths[:, None]  # real tokens first, as the store lays them out
        self.ids[~self.mask] = 0

    def lengths(self, news):
        return self.mask[torch.from_numpy(news)].sum(-1).numpy()

    def prepare(self, news, width=None):
        rows = torch.from_numpy(np.asarray(news, dtype=np.int64))
        return NewsTokens(np.asarray(news), self.ids[rows], self.mask[rows], None,
                          self.mask[rows].sum(-1).numpy().astype(np.int64))


def _encode(model, precision, titles):
    served, amp = inference_model(model, precision)
    with torch.inference_mode():
        return encode_news(served, titles, np.arange(len(titles.ids)), DistInfo(), 8, amp)


def test_int8_quantises_the_layers_linears_stays_close_to_fp32_and_leaves_the_model_untouched():
    model, titles = _model(), _Titles()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _encode(model, "fp32", titles)
    served, amp = inference_model(model, "int8")
    # query, key, value, attention output, intermediate, output: 6 per layer; nothing else (the poolings read
    # their projection's weight, which a quantised linear does not hold as a tensor)
    assert quantized_linears(served) == 6 * SHAPE["layers"] and amp == "off"
    assert quantized_linears(served.news_encoder.pool) == 0 and quantized_linears(served.user_encoder) == 0
    with torch.profiler.profile() as prof:
        out = _encode(model, "int8", titles)
    ops = {e.key: e.count for e in prof.key_averages()}
    # the evaluation's path runs the int8 kernels: 6 maps x 2 layers x 3 batches of 8 news; float matmuls
    # (addmm) only in the poolings' and projection's maps (news head, 3 batches)
    assert ops.get("quantized::linear_dynamic") == 6 * SHAPE["layers"] * 3
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.equal(out, ref)  # the quantised path ran
    # int8 weights (1/254 of each output channel's range) and activations (1/255 of the batch's range) put at most
    # ~0.5% relative error on each linear map's output, and the residual path carries the layer's input unquantised:
    # the vectors stay within 1% (0.1% measured), their direction within cosine 0.9995 (0.9999998 measured)
    cos = torch.nn.functional.cosine_similarity(out, ref)
    assert cos.min() > 0.9995
    assert (out - ref).norm(dim=1).max() < 0.01 * ref.norm(dim=1).min()
    # the float model is untouched: same modules, same weights, same vectors
    assert quantized_linears(model) == 0 and isinstance(model.news_encoder.backbone.layers[0].attention.self.query,
                                                        nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(_encode(model, "fp32", titles), ref)


def test_bf16_inference_gives_float32_vectors_close_to_fp32_and_leaves_the_model_in_float32():
    model, titles = _model(), _Titles()
    ref = _encode(model, "fp32", titles)
    served, amp = inference_model(model, "bf16")
    assert amp == "bf16" and served.news_encoder.backbone.layers[0].intermediate.dense.weight.dtype == torch.bfloat16
    out = _encode(model, "bf16", titles)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value), states and weights alike, through
    # every operation under autocast: within 4% (1.7% measured), direction within cosine 0.999 (0.99997 measured)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.999
    assert (out - ref).norm(dim=1).max() < 0.04 * ref.norm(dim=1).min()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_parameter_count_equals_a_hand_count():
    h, i, v, pos = SHAPE["hidden"], SHAPE["intermediate"], 100, 512
    embeddings = v * h + pos * h + 2 * h + 2 * h  # words, positions, 2 token types, LayerNorm
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # q k v o, LN, intermediate, output, LN
    news_head = (h * 8 + 8 + 8) + (h * 16 + 16)  # attention pooling (projection, query), projection to dim 16
    user = (16 * 8 + 8 + 8) + 16  # attention pooling over news vectors, the empty-history vector
    counts = parameter_counts(_model())
    assert counts == {"total": embeddings + 2 * layer + news_head + user, "embeddings": embeddings,
                      "without_embeddings": 2 * layer + news_head + user}
    assert counts["total"] == 37760


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        inference_model(_model(), "fp16")


# -- benchmarks.efficiency's tables, from fabricated measurements ----------------------------------------------
def _fabricated(student2_int8=6000.0, int8_auc=0.695):
    speeds = {"teacher": (1000.0, 1800.0, 2200.0), "student_l1": (4000.0, 7000.0, 9000.0),
              "student_l2": (2500.0, 4500.0, student2_int8), "student_l4": (1500.0, 2700.0, 3300.0)}
    params = {"teacher": (22_700_000, 11_900_000, 6), "student_l1": (13_800_000, 11_900_000, 1),
              "student_l2": (15_600_000, 11_900_000, 2), "student_l4": (19_200_000, 11_900_000, 4)}
    auc = {}
    for variant in speeds:
        auc[variant] = {"fp32": {0: {"auc": 0.70}, 1: {"auc": 0.72}},
                        "bf16": {0: {"auc": 0.70}, 1: {"auc": 0.72}},
                        "int8": {0: {"auc": int8_auc}, 1: {"auc": int8_auc + 0.02}}}
    measured = {
        "auc": auc, "threads": 2, "precisions": ["fp32", "bf16", "int8"], "bf16_native": "CPU with avx512_bf16",
        "int8_path": "torch.ao",
        "news_per_s": {k: {p: {"median": s, "blocks": [s]} for p, s in zip(("fp32", "bf16", "int8"), v)}
                       for k, v in speeds.items()},
        "params": {k: {"total": t, "embeddings": e, "without_embeddings": t - e, "layers": n}
                   for k, (t, e, n) in params.items()},
        "recorded_auc": {k: {0: 0.70, 1: 0.72} for k in speeds}}
    seconds = {"posttrain": 100.0, "distill_posttrain": 50.0, "finetune_teachers": 300.0, "distill_finetune": 80.0}

    def run(n, extra=0.0):
        s = {k: v + extra for k, v in seconds.items()}
        if n != 2:
            s = {k: v for k, v in s.items() if k.startswith("distill")}
        return Path(f"seed_l{n}"), {"command": "x", "summary": {"seconds": s, "models": {}}}

    runs = {0: {n: run(n) for n in (1, 2, 4)}, 1: {n: run(n, 10.0) for n in (1, 2, 4)}}
    return measured, runs


def test_efficiency_rows_ratios_and_the_goal_met():
    from benchmarks.efficiency import figure_table, stage_table, summarize

    measured, runs = _fabricated()
    d = summarize(measured, runs, [1, 2, 4])
    d.update(layers=[1, 2, 4])
    rows = {r["layers"]: r for r in d["rows"]}
    assert [r["layers"] for r in d["rows"]] == [6, 1, 2, 4] and d["rows"][0]["model"] == "teacher"
    s2 = rows[2]
    assert set(s2["news_per_s"]) == set(s2["auc"]) == {"fp32", "bf16", "int8"}
    assert s2["speedup_vs_teacher_fp32"]["int8"] == pytest.approx(6.0)
    assert s2["auc"]["fp32"] == pytest.approx(0.71) and s2["auc_std"]["fp32"] == pytest.approx(0.01414, abs=1e-4)
    assert s2["auc_minus_fp32_points"]["int8"][0] == pytest.approx(-0.5)  # paired by seed: -0.5 points on each
    assert s2["fewer_params_than_teacher"] == pytest.approx(1 - 15.6 / 22.7)
    # int8 is fastest but costs 0.5 points, past the 0.3 bar: bf16 is its best precision, 4.5x: goal not met
    assert s2["best_precision"] == "bf16"
    assert d["verdict"][0].startswith("Goal not met") and "4.5x" in d["verdict"][0]
    assert "int8" in d["verdict"][1] and "-0.50" in d["verdict"][1]
    assert d["stage_seconds"]["distill_finetune"]["1"] == {"mean": 85.0, "std": pytest.approx(7.071, abs=1e-3),
                                                           "seeds": 2}
    assert d["stage_seconds"]["posttrain"] == {"teacher": {"mean": 105.0, "std": pytest.approx(7.071, abs=1e-3),
                                                           "seeds": 2}}
    table = figure_table(d)
    assert "| Tiny-NewsRec student | 2 | 15.60M | 3.70M | 31% | 2,500 (2.5x) | 4,500 (4.5x) | 6,000 (6.0x) |" in table
    assert "71.00 ± 1.41 | 71.00 ± 1.41 (+0.00) | 70.50 ± 1.41 (-0.50) | bf16 |" in table
    assert "| Stage II: distillation on clicks |  | 85 ± 7 | 85 ± 7 | 85 ± 7 | 10 h, 8 h, 6 h |" in stage_table(d)


def test_efficiency_goal_met_when_the_fast_precision_keeps_its_auc():
    from benchmarks.efficiency import summarize

    measured, runs = _fabricated(int8_auc=0.699)
    d = summarize(measured, runs, [1, 2, 4])
    s2 = next(r for r in d["rows"] if r["layers"] == 2)
    assert s2["best_precision"] == "int8"
    assert d["verdict"][0].startswith("Goal met") and "6.0x" in d["verdict"][0] and "-0.10 points" in d["verdict"][0]
    # the paper's claims, from the numbers: fp32 speedups 4.0x, 2.5x, 1.5x (not all within 2-8x)
    assert "1 layer 4.0x, 2 layers 2.5x, 4 layers 1.5x (not all within it)" in d["verdict"][1]
    assert "1 layer 39%" in d["verdict"][2] and "not all within that range" in d["verdict"][2]


def test_int8_activations_use_8_bits_where_the_cpu_multiplies_without_int16_overflow():
    import copy

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from speedyrec.models.inference import cpu_has_vnni, full_range_linear_class, quantize_linears

    assert cpu_has_vnni("processor : 0\nflags : fpu sse avx512f avx512_vnni\n")
    assert not cpu_has_vnni("processor : 0\nflags : fpu sse avx2 fma\n")
    model, titles = _model(), _Titles()
    ids, mask = titles.ids, titles.mask
    with torch.inference_mode():
        ref = model.news_encoder(ids, mask)
        for full in (False, True):
            q = copy.deepcopy(model)
            quantize_linears(q.news_encoder.backbone.layers, full_range=full)
            kinds = {type(m) for m in q.modules() if isinstance(m, DynamicLinear)}
            assert kinds == {full_range_linear_class() if full else DynamicLinear}
            out = q.news_encoder(ids, mask)
            assert not torch.equal(out, ref)
            assert (out - ref).norm(dim=1).max() < 0.01 * ref.norm(dim=1).min()
