"""Inference at fp32, bf16 and int8 (speedyrec.models.inference) and benchmarks.efficiency's tables."""
from __future__ import annotations

import json

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
PARAMS = {"teacher": (22_700_000, 11_900_000, 6), "student_l1": (13_800_000, 11_900_000, 1),
          "student_l2": (15_600_000, 11_900_000, 2), "student_l4": (19_200_000, 11_900_000, 4)}
SPEEDS = {"teacher": (1000.0, 1800.0, 2200.0), "student_l1": (4000.0, 7000.0, 9000.0),
          "student_l2": (2500.0, 4500.0, 6000.0), "student_l4": (1500.0, 2700.0, 3300.0)}


def _fabricated(student2_int8=6000.0, int8_auc=0.695):
    """Two recorded seeds of every model (fp32 and bf16 AUC 0.70 and 0.72, int8 ``int8_auc`` and 0.02 more), their
    runs (the base run with every step, the other sizes with their two stages; seed 1's steps 10 s longer; the base
    run's Stage I built the teachers' banks in 20 s of its time, the others read them) and one complete invocation's
    speed."""
    per_seed, runs = {}, {}
    seconds = {"posttrain": 100.0, "distill_posttrain": 50.0, "finetune_teachers": 300.0, "distill_finetune": 80.0,
               "student_plain": 40.0}
    for seed in (0, 1):
        extra = 10.0 * seed
        runs[f"base_seed_{seed}"] = {"command": "x", "summary": {"seconds": {k: v + extra for k, v in seconds.items()}},
                                     "bank_seconds": {k: 20.0 if k == "distill_posttrain" else 0.0 for k in seconds}}
        for n in (1, 4):
            runs[f"eff_l{n}_seed_{seed}"] = {"command": "x", "summary": {"seconds": {
                k: v + extra for k, v in seconds.items() if k.startswith("distill")}},
                "bank_seconds": {"distill_posttrain": 0.004, "distill_finetune": 0.0}}
        fp32 = 0.70 + 0.02 * seed
        per_seed[str(seed)] = {
            variant: {"run": f"base_seed_{seed}" if variant in ("teacher", "student_l2") else
                      f"eff_l{variant[-1]}_seed_{seed}", "model": "teacher_1" if variant == "teacher" else "student",
                      "layers": n, "params": {"total": t, "embeddings": e, "without_embeddings": t - e},
                      "metrics": {"fp32": {"auc": fp32}, "bf16": {"auc": fp32}, "int8": {"auc": int8_auc + 0.02 * seed}},
                      "auc_recorded_by_the_run": fp32, "commit": "abc1234", "date": "2025-01-01 00:00 UTC"}
            for variant, (t, e, n) in PARAMS.items()}
    speeds = {**SPEEDS, "student_l2": (2500.0, 4500.0, student2_int8)}
    speed = {"date": "2025-01-02 00:00 UTC", "commit": "def5678", "complete": True,
             "news_per_s": {k: {p: {"median": s, "blocks": [s]} for p, s in zip(("fp32", "bf16", "int8"), v)}
                            for k, v in speeds.items()}}
    return per_seed, runs, speed


def _tables(per_seed, runs, speed):
    from benchmarks.efficiency import summarize, verdict

    d = summarize(per_seed, runs, speed)
    d.update(speed=speed, per_seed=per_seed)
    d["verdict"] = verdict(d)
    return d


def test_efficiency_rows_ratios_and_the_goal_met():
    from benchmarks.efficiency import figure_table, stage_table

    per_seed, runs, speed = _fabricated()
    d = _tables(per_seed, runs, speed)
    rows = {r["layers"]: r for r in d["rows"]}
    assert [r["layers"] for r in d["rows"]] == [6, 1, 2, 4] and d["rows"][0]["model"] == "teacher"
    s2 = rows[2]
    assert set(s2["news_per_s"]) == set(s2["auc"]) == {"fp32", "bf16", "int8"}
    assert s2["speedup_vs_teacher_fp32"]["int8"] == pytest.approx(6.0)
    assert s2["auc"]["fp32"] == pytest.approx(0.71) and s2["auc_std"]["fp32"] == pytest.approx(0.01414, abs=1e-4)
    assert s2["auc_per_seed"]["int8"] == {0: pytest.approx(0.695), 1: pytest.approx(0.715)}
    assert s2["auc_minus_fp32_points"]["int8"][0] == pytest.approx(-0.5)  # paired by seed: -0.5 points on each
    assert s2["fewer_params_than_teacher"] == pytest.approx(1 - 15.6 / 22.7)
    # int8 is fastest but costs 0.5 points, past the 0.3 bar: bf16 is its best precision, 4.5x: goal not met
    assert s2["best_precision"] == "bf16"
    assert d["verdict"][0].startswith("Goal not met") and "4.5x" in d["verdict"][0]
    assert "Speed: the invocation of 2025-01-02 00:00 UTC (commit def5678); AUC: mean over seed(s) 0, 1" in d["verdict"][0]
    assert "int8" in d["verdict"][1] and "-0.50" in d["verdict"][1]
    assert "Fewer than 3 seeds" in d["verdict"][-1]
    # A.4: the teacher's steps from the base runs, each student's from its own run, the baseline where a run has it
    def spread(mean, lo, hi):
        return {"mean": mean, "std": pytest.approx(7.071, abs=1e-3), "median": mean, "min": lo, "max": hi, "seeds": 2,
                "bank_unknown": 0}

    assert d["stage_seconds"]["distill_finetune"]["1"] == spread(85.0, 80.0, 90.0)
    assert d["stage_seconds"]["posttrain"] == {"teacher": spread(105.0, 100.0, 110.0)}
    assert d["stage_seconds"]["student_plain"] == {"2": spread(45.0, 40.0, 50.0)}
    # Stage I without the banks' building: the 2-layer run built them (20 s of its 50/60), the others read them
    assert d["stage_seconds"]["distill_posttrain"]["2"]["mean"] == pytest.approx(35.0)
    assert d["stage_seconds"]["distill_posttrain"]["1"]["mean"] == pytest.approx(55.0 - 0.004)
    assert d["stage_seconds"]["banks"] == {"distill_posttrain": {"mean": 20.0, "std": 0.0, "median": 20.0, "min": 20.0,
                                                                 "max": 20.0, "seeds": 2}}
    assert "newsbert" not in d["stage_seconds"]
    table = figure_table(d)
    assert "| Tiny-NewsRec student | 2 | 15.60M | 3.70M | 31% | 2,500 (2.5x) | 4,500 (4.5x) | 6,000 (6.0x) |" in table
    assert "71.00 ± 1.41 | 71.00 ± 1.41 (+0.00) | 70.50 ± 1.41 (-0.50) | bf16 | 2 |" in table
    stages = stage_table(d)
    assert "| Stage II: distillation on clicks |  | 85 (80-90) | 85 (80-90) | 85 (80-90) | 10 h, 8 h, 6 h |" in stages
    assert "| teacher post-training (M snapshots) | 105 (100-110) |  |  |  | 12 h |" in stages
    assert "| the teachers' banks for Stage I (built once per seed by the base run, read by the runs that link" in stages
    assert "not in the rows above) | 20 (20-20) |  |  |  |  |" in stages
    # a run that did not record its banks' time is counted whole, and the row says so
    del runs["base_seed_1"]["bank_seconds"]
    d = _tables(per_seed, runs, speed)
    assert d["stage_seconds"]["distill_posttrain"]["2"]["mean"] == pytest.approx((30.0 + 60.0) / 2)
    assert "Stage I: distillation on title-body matching (1 of its cells' seeds with the banks' building" \
        in stage_table(d)
    # a seed that shared the cores moves the mean, not the median the table shows
    from benchmarks.efficiency import _seconds_cell, _spread

    contended = _spread([110.0, 112.0, 1067.0])
    assert contended["median"] == 112.0 and contended["mean"] == pytest.approx(429.667, abs=1e-3)
    assert _seconds_cell(contended) == "112 (110-1067)"
    assert "| baseline: the student finetuned alone (where a run trained it) |  |  | 45 (40-50) |  |  |" in stages


def test_efficiency_goal_met_when_the_fast_precision_keeps_its_auc():
    d = _tables(*_fabricated(int8_auc=0.699))
    s2 = next(r for r in d["rows"] if r["layers"] == 2)
    assert s2["best_precision"] == "int8"
    assert d["verdict"][0].startswith("Goal met") and "6.0x" in d["verdict"][0] and "-0.10 points" in d["verdict"][0]
    # the paper's claims, from the numbers: fp32 speedups 4.0x, 2.5x, 1.5x (not all within 2-8x)
    assert "1 layer 4.0x, 2 layers 2.5x, 4 layers 1.5x (not all within it)" in d["verdict"][1]
    assert "1 layer 39%" in d["verdict"][2] and "not all within that range" in d["verdict"][2]


def test_efficiency_goal_not_judged_without_a_timing():
    per_seed, runs, _ = _fabricated()
    d = _tables(per_seed, runs, None)
    assert d["verdict"][0].startswith("Goal not judged")
    assert all(v is None for r in d["rows"] for v in r["news_per_s"].values())
    assert d["rows"][2]["auc"]["fp32"] == pytest.approx(0.71)


# -- benchmarks.efficiency's runs and records across sessions, with fabricated jobs and models -----------------
@pytest.fixture
def eff(tmp_path, monkeypatch):
    """benchmarks.efficiency with its results in tmp_path/results, every training job fabricated (quality's
    run_job: a spy), models loaded as tiny recommenders of the run's size, evaluation and timing fabricated: a
    model's AUC is 0.70 + 0.001 x layers + 0.01 x seed at fp32 and bf16, 0.1 point less at int8; its news/s is
    6000 / layers (x 1.5 bf16, x 2.2 int8) x the invocation's number. Returns (module, calls, results folder)."""
    import benchmarks.common as common
    import benchmarks.efficiency as efficiency
    import benchmarks.quality as quality

    results = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS", results)
    for module in (common, quality, efficiency):
        monkeypatch.setattr(module, "source_commit", lambda: "abc1234")
    calls = {"jobs": [], "loaded": [], "timed": []}

    def seed_of(words):
        return int(next(o for o in words if o.startswith("train.seed=")).split("=")[1])

    def run_job(name, overrides, root, timeout):
        calls["jobs"].append((name, overrides))
        (root / name / "finetune_teachers").mkdir(parents=True)
        if name.startswith("base_seed_"):  # its teachers are what the other sizes link
            (root / name / "finetune_teachers" / "done.json").write_text("{}")
        n = next((int(o.split("=")[1]) for o in overrides if o.startswith("distill.student_layers=")), 2)
        steps = ["distill_posttrain", "distill_finetune"] + (
            ["posttrain", "finetune_teachers", "student_plain"] if name.startswith("base_seed_") else [])
        models = {"teacher_1": 0.70, "teacher_2": 0.69, "plain": 0.68, "student": 0.70 + 0.001 * n}
        return {"command": "python -m speedyrec.train " + " ".join(overrides), "process_seconds": 1.0,
                "metrics": {"models": {k: {"auc": v} for k, v in models.items()},
                            "seconds": {s: 10.0 * n + seed_of(overrides) for s in steps}}}

    def load_models(run_dir, run, variants):
        calls["loaded"].append((run_dir.name, tuple(variants)))
        seed = seed_of(run["command"].split())
        n = next((int(o.split("=")[1]) for o in run["command"].split() if o.startswith("distill.student_layers=")), 2)
        return {"seed": seed}, {v: _sized_model(6 if v == "teacher" else n) for v in variants}

    def evaluate_precisions(ctx, model, precisions):
        fp32 = 0.70 + 0.001 * len(model.news_encoder.backbone.layers) + 0.01 * ctx["seed"]
        return {p: {"auc": fp32 - (0.001 if p == "int8" else 0.0), "mrr": 0.3} for p in precisions}

    def time_models(timed, precisions, batch, news, rounds):
        calls["timed"].append({v: seed for v, (seed, _, _) in timed.items()})
        k = len(calls["timed"])
        scale = {"fp32": 1.0, "bf16": 1.5, "int8": 2.2}
        return {v: {p: {"median": k * scale[p] * 6000 / len(model.news_encoder.backbone.layers), "blocks": [1.0]}
                    for p in precisions} for v, (_, model, _) in timed.items()}

    monkeypatch.setattr(quality, "run_job", run_job)
    monkeypatch.setattr(efficiency, "load_models", load_models)
    monkeypatch.setattr(efficiency, "evaluate_precisions", evaluate_precisions)
    monkeypatch.setattr(efficiency, "time_models", time_models)
    monkeypatch.setattr(efficiency, "precisions_here", lambda: {
        "precisions": ["fp32", "bf16", "int8"], "bf16_native": "CPU with avx512_bf16", "int8_path": "torch.ao"})
    return efficiency, calls, results


def _sized_model(layers):
    torch.manual_seed(0)
    shape = {**SHAPE, "layers": layers}
    return NewsRecommender(BertFamilyBackbone(random_bert(shape, vocab_size=100, pad_id=0)), dim=16,
                           attention_dim=8).eval()


def test_the_other_sizes_train_only_their_stages_linking_the_base_runs_teachers(eff, tmp_path):
    efficiency, calls, results = eff
    out = tmp_path / "runs"
    d = efficiency.main(["--seeds", "0", "--out", str(out)])
    jobs = dict(calls["jobs"])
    assert list(jobs) == ["base_seed_0", "eff_l1_seed_0", "eff_l4_seed_0"]
    base = jobs["base_seed_0"]
    assert {"stage=pipeline", "pipeline.baselines=true", "pipeline.newsbert=false", "train.seed=0"} <= set(base)
    for n in (1, 4):
        o = jobs[f"eff_l{n}_seed_0"]
        assert {"stage=pipeline", "train.seed=0", f"distill.student_layers={n}",
                f"pipeline.teachers_from={out / 'base_seed_0'}"} <= set(o)
        assert not any(w.startswith(("pipeline.baselines", "pipeline.newsbert")) for w in o)  # no baselines
    # the base run gives the teacher and the 2-layer student, loaded from one context
    assert calls["loaded"] == [("eff_l1_seed_0", ("student_l1",)), ("base_seed_0", ("teacher", "student_l2")),
                               ("eff_l4_seed_0", ("student_l4",))]
    saved = json.loads((results / "efficiency.json").read_text())
    rows = {r["layers"]: r for r in saved["rows"]}
    assert set(rows) == {6, 1, 2, 4} and set(rows[2]["news_per_s"]) == set(rows[2]["auc"]) == {"fp32", "bf16", "int8"}
    assert rows[1]["auc"]["fp32"] == pytest.approx(0.701) and rows[6]["auc"]["int8"] == pytest.approx(0.705)
    assert rows[2]["speedup_vs_teacher_fp32"]["fp32"] == pytest.approx(3.0)
    assert saved["per_seed"]["0"]["student_l4"]["run"] == "eff_l4_seed_0"
    assert saved["per_seed"]["0"]["teacher"]["model"] == "teacher_1"
    assert saved["runs"]["eff_l1_seed_0"]["command"].endswith("distill.student_layers=1 " +
                                                              f"pipeline.teachers_from={out / 'base_seed_0'}")
    # A.4: the 1-layer student's stages are its run's; the teacher's steps the base run's
    assert saved["stage_seconds"]["distill_posttrain"]["1"]["mean"] == 10.0
    assert saved["stage_seconds"]["posttrain"] == {"teacher": {"mean": 20.0, "std": 0.0, "median": 20.0, "min": 20.0,
                                                              "max": 20.0, "seeds": 1, "bank_unknown": 1}}
    assert set(saved["stage_seconds"]["student_plain"]) == {"2"}
    assert len(saved["speed_history"]) == 1 and saved["speed_history"][0]["complete"] and saved["speed_index"] == 0
    assert d["verdict"][0].startswith("Goal met")  # 2-layer int8: 6.6x the teacher, 0.1 point below its fp32
    # kept in --out: a second invocation of the same seed in this session trains nothing (it is recorded, too)
    calls["jobs"].clear()
    efficiency.main(["--seeds", "0", "--out", str(out), "--fresh"])
    assert calls["jobs"] == [] and len(calls["loaded"]) == 6


def test_a_kept_quality_run_of_another_size_stands_in_for_its_student_run(eff, tmp_path):
    """benchmarks.quality's seed_S_lN in the same --out is the same student: used, with its baselines' steps."""
    import benchmarks.quality as quality

    efficiency, calls, results = eff
    out = tmp_path / "runs"
    overrides = quality.pipeline_overrides(0, 1, False)
    (out / "seed_0_l1").mkdir(parents=True)
    (out / "seed_0_l1" / "quality_run.json").write_text(json.dumps({
        "command": "-m speedyrec.train " + " ".join(overrides), "commit": "abc1234",
        "summary": {"models": {"student": {"auc": 0.7}}, "seconds": {"distill_posttrain": 7.0, "distill_finetune": 8.0,
                                                                     "student_plain": 5.0, "newsbert": 30.0}}}))
    efficiency.main(["--seeds", "0", "--out", str(out), "--layers", "1,2"])
    assert [name for name, _ in calls["jobs"]] == ["base_seed_0"]
    saved = json.loads((results / "efficiency.json").read_text())
    assert saved["per_seed"]["0"]["student_l1"]["run"] == "seed_0_l1"
    assert saved["stage_seconds"]["newsbert"] == {"1": {"mean": 30.0, "std": 0.0, "median": 30.0, "min": 30.0, "max": 30.0,
                                                        "seeds": 1, "bank_unknown": 1}}
    assert set(saved["stage_seconds"]["student_plain"]) == {"1", "2"}
    assert "NewsBERT" in (results / "efficiency.md").read_text()


def test_a_recorded_seed_is_reused_without_its_models_and_the_next_one_joins_it(eff, tmp_path):
    import shutil

    efficiency, calls, results = eff
    efficiency.main(["--seeds", "0", "--out", str(tmp_path / "session_1")])
    first = json.loads((results / "efficiency.json").read_text())
    shutil.rmtree(tmp_path / "session_1")  # the session ends: its run folders are gone, the results file stays
    calls["jobs"].clear(), calls["loaded"].clear()
    efficiency.main(["--seeds", "0,1", "--out", str(tmp_path / "session_2")])
    assert {name.rsplit("_", 1)[1] for name, _ in calls["jobs"]} == {"1"}  # seed 0 is neither trained nor loaded
    assert {name.rsplit("_", 1)[1] for name, _ in calls["loaded"]} == {"1"}
    saved = json.loads((results / "efficiency.json").read_text())
    assert saved["per_seed"]["0"] == first["per_seed"]["0"] and set(saved["per_seed"]) == {"0", "1"}
    assert {"base_seed_0", "eff_l1_seed_0", "base_seed_1", "eff_l4_seed_1"} <= set(saved["runs"])
    rows = {r["layers"]: r for r in saved["rows"]}
    assert rows[2]["seeds"] == [0, 1] and rows[2]["auc"]["fp32"] == pytest.approx(0.707)
    assert rows[2]["auc_per_seed"]["fp32"] == {"0": pytest.approx(0.702), "1": pytest.approx(0.712)}
    assert rows[2]["auc_minus_fp32_points"]["int8"][0] == pytest.approx(-0.1)
    assert saved["stage_seconds"]["distill_finetune"]["4"]["seeds"] == 2
    # this invocation timed seed 1's models (the only ones it has): the newest complete timing is the table
    assert calls["timed"][-1] == {"teacher": 1, "student_l1": 1, "student_l2": 1, "student_l4": 1}
    assert len(saved["speed_history"]) == 2 and saved["speed_index"] == 1
    assert rows[6]["news_per_s"]["fp32"] == pytest.approx(2000.0)
    md = (results / "efficiency.md").read_text()
    assert "## Each seed" in md and "| 0 | student_l4 | `eff_l4_seed_0` (student) | 70.40 |" in md
    # a recorded model whose run ran other settings than today's is left out, not reused
    first_run = saved["runs"]["eff_l1_seed_0"]
    first_run["command"] = first_run["command"].replace("train.seed=0", "train.seed=7")
    (results / "efficiency.json").write_text(json.dumps(saved))
    d = efficiency.main(["--kept-only"])
    assert next(r for r in d["rows"] if r["layers"] == 1)["seeds"] == [1]


def test_the_speed_table_is_the_latest_complete_timing_and_every_timing_is_kept(eff, tmp_path):
    efficiency, calls, results = eff
    efficiency.main(["--seeds", "0", "--out", str(tmp_path / "a")])
    efficiency.main(["--seeds", "1", "--out", str(tmp_path / "b")])
    d = efficiency.main(["--seeds", "2", "--layers", "2", "--out", str(tmp_path / "c")])  # times 2 of the 4 models
    history = d["speed_history"]
    assert [s["complete"] for s in history] == [True, True, False] and d["speed_index"] == 1
    assert [set(s["news_per_s"]) for s in history][2] == {"teacher", "student_l2"}
    assert all({"commit", "date", "load_average_before", "load_average_after", "threads"} <= set(s) for s in history)
    rows = {r["layers"]: r for r in d["rows"]}
    # speed from the second invocation (x2), AUC over every recorded seed
    assert rows[6]["news_per_s"]["fp32"] == pytest.approx(2000.0) and rows[1]["news_per_s"]["int8"] == pytest.approx(26400.0)
    assert rows[2]["seeds"] == [0, 1, 2] and rows[1]["seeds"] == [0, 1]
    assert rows[2]["auc"]["fp32"] == pytest.approx(0.712)
    assert "Fewer than 3 seeds for the 1-layer student, the 4-layer student" in d["verdict"][-1]
    assert f"Speed: the invocation of {history[1]['date']}" in d["verdict"][0]
    md = (results / "efficiency.md").read_text()
    assert "## Every invocation's timing" in md and md.count(" (the table) |") == 1
    assert "--seeds 1 --out" in md.split("News encoded per second: timed by")[1].split("\n")[0]
    # a partial timing with nothing complete before it is shown, and said to be partial
    assert efficiency.speed_index([{"complete": False}, {"complete": False}]) == 1
    assert efficiency.speed_index([]) is None


def test_kept_only_trains_evaluates_and_times_nothing(eff, tmp_path, monkeypatch):
    efficiency, calls, results = eff
    efficiency.main(["--seeds", "0", "--out", str(tmp_path / "a")])
    before = json.loads((results / "efficiency.json").read_text())
    calls["jobs"].clear(), calls["loaded"].clear(), calls["timed"].clear()

    def refused(*a, **k):
        raise AssertionError("--kept-only measured something")
    for name in ("load_models", "evaluate_precisions", "time_models", "obtain_run"):
        monkeypatch.setattr(efficiency, name, refused)
    d = efficiency.main(["--kept-only", "--out", str(tmp_path / "a"), "--seeds", "0,1"])
    after = json.loads((results / "efficiency.json").read_text())
    assert not calls["jobs"] and after["rows"] == before["rows"] and after["speed_history"] == before["speed_history"]
    assert after["per_seed"] == before["per_seed"] and d["seeds"] == [0]
    (results / "efficiency.json").unlink()
    with pytest.raises(SystemExit, match="nothing is recorded"):
        efficiency.main(["--kept-only"])


def test_timing_interleaves_every_model_at_every_precision_through_encode_news(monkeypatch):
    """time_models on tiny models: one warm-up and ``rounds`` blocks per model and precision, in turn, through the
    evaluation's encode_news (the token store stood in for by fixed token rows)."""
    from types import SimpleNamespace

    import benchmarks.efficiency as efficiency
    import speedyrec.build as build
    import speedyrec.eval.evaluate as evaluate
    import speedyrec.models.news_inputs as news_inputs

    titles = _Titles(n=24)
    monkeypatch.setattr(news_inputs, "NewsInputs", lambda store, segments: titles)
    monkeypatch.setattr(build, "segments_of", lambda cfg: 1)
    order = []
    encode = evaluate.encode_news

    def spy(served, inputs, news, dist, batch, amp):
        order.append((len(served.news_encoder.backbone.layers), amp, len(news), batch))
        return encode(served, inputs, news, dist, batch, amp)
    monkeypatch.setattr(evaluate, "encode_news", spy)
    ctx = SimpleNamespace(store=SimpleNamespace(num_news=24), cfg=None)
    timed = {"teacher": (0, _sized_model(6), ctx), "student_l2": (0, _sized_model(2), ctx)}
    out = efficiency.time_models(timed, ["fp32", "int8"], batch=8, news=16, rounds=3)
    assert set(out) == {"teacher", "student_l2"} and all(set(v) == {"fp32", "int8"} for v in out.values())
    assert all(len(m["blocks"]) == 3 and m["median"] > 0 for v in out.values() for m in v.values())
    assert len(order) == 4 * (1 + 3) and all(n == 16 and b == 8 for _, _, n, b in order)
    assert [layers for layers, *_ in order[4:8]] == [6, 6, 2, 2]  # each round times every variant in turn


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
