"""The arithmetic the benchmark tables rest on: time to a target AUC, AUC at a time, R², BusLM's cutting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.buslm import segmented
from benchmarks.scaling import r2_through_origin
from benchmarks.speedup import _window_summary, auc_at, seconds_to

JOB = {"curve": [{"train_seconds": 10.0, "auc": 0.60}, {"train_seconds": 20.0, "auc": 0.65},
                 {"train_seconds": 30.0, "auc": 0.64}, {"train_seconds": 40.0, "auc": 0.70}]}


def test_seconds_to_is_the_first_evaluation_at_or_above_the_target():
    assert seconds_to(JOB, 0.65) == 20.0
    assert seconds_to(JOB, 0.66) == 40.0  # 0.64 at 30 s does not count
    assert seconds_to(JOB, 0.50) == 10.0
    assert seconds_to(JOB, 0.71) is None


def test_auc_at_is_the_last_evaluation_within_the_time():
    assert auc_at(JOB, 30.0) == 0.64
    assert auc_at(JOB, 39.9) == 0.64
    assert auc_at(JOB, 5.0) is None


def test_a_window_summary_counts_only_what_happened_within_its_time():
    job = {**JOB, "stats": {"clicks_per_second": 10.0}}
    w = _window_summary(job, 30.0, 0.70)  # the target is reached at 40 s, after the window
    assert w["best_auc_within_cap"] == 0.65 and w["auc_at_cap"] == 0.64 and w["seconds_to_target"] is None
    assert _window_summary(job, 30.0, 0.65)["seconds_to_target"] == 20.0


def test_r2_through_origin():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    slope, r2 = r2_through_origin(x, 3.0 * x)
    assert slope == pytest.approx(3.0) and r2 == pytest.approx(1.0)
    _, r2_noisy = r2_through_origin(x, 3.0 * x + np.array([1.0, -1.0, 1.0, -1.0]))
    assert 0.9 < r2_noisy < 1.0
    _, r2_flat = r2_through_origin(x, np.array([5.0, 5.1, 4.9, 5.0]))  # constant cost: not linear in x
    assert r2_flat < 0


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_buslm_segments_cover_the_document_in_order(k):
    docs = [list(range(10, 10 + n)) for n in (96, 131, 510)]
    ids, mask = segmented(docs, k, cls=1, sep=2)
    assert ids.shape[:2] == (3, k)
    for n, doc in enumerate(docs):
        pieces = [ids[n, s][mask[n, s]].tolist() for s in range(k)]
        assert all(p[0] == 1 and p[-1] == 2 for p in pieces)
        assert [t for p in pieces for t in p[1:-1]] == doc
        lengths = [len(p) for p in pieces]
        assert max(lengths) - min(lengths) <= 1  # near-equal pieces
    assert not mask[..., ids.shape[-1]:].any() and torch.equal(ids[~mask], torch.zeros_like(ids[~mask]))


def _quality_summary(seed: int, layers: int = 2, newsbert: bool = True) -> dict:
    m = lambda auc: {"auc": auc, "mrr": 0.3, "ndcg5": 0.4, "ndcg10": 0.5}
    models = {"teacher_1": {**m(0.70 + seed / 100), "layers": 6}, "teacher_2": {**m(0.72 + seed / 100), "layers": 6},
              "plain": {**m(0.69), "layers": 6}, "student": {**m(0.68 + layers / 100), "layers": layers},
              "student_plain": {**m(0.66), "layers": layers}, "newsbert_student": {**m(0.67), "layers": layers}}
    if not newsbert:
        del models["newsbert_student"]
    if seed == 1:  # runs made before the teachers' mean score was evaluated lack it
        models["ensemble"] = {**m(0.75), "layers": 6}
    return {"models": models, "seconds": {"posttrain": 1.0}}


@pytest.fixture
def fake_quality(tmp_path, monkeypatch):
    """benchmarks.quality with its results in tmp_path and a pipeline run that only records its overrides."""
    import benchmarks.common as common
    import benchmarks.quality as quality

    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ran = []

    def fake_run_job(name, overrides, root, timeout):
        ran.append(overrides)
        (root / name / "finetune_teachers").mkdir(parents=True, exist_ok=True)  # the run's out_dir, teachers finished
        (root / name / "finetune_teachers" / "done.json").write_text("{}")
        seed = int(next(o for o in overrides if o.startswith("train.seed=")).split("=")[1])
        layers = int(next((o.split("=")[1] for o in overrides if o.startswith("distill.student_layers=")), 2))
        return {"command": "-m speedyrec.train " + " ".join(overrides), "process_seconds": 1.0,
                "metrics": _quality_summary(seed, layers, "pipeline.newsbert=false" not in overrides)}

    monkeypatch.setattr(quality, "run_job", fake_run_job)
    return quality, ran


def test_quality_reuses_committed_seeds_with_the_same_settings_and_reruns_the_rest(tmp_path, fake_quality):
    """A seed takes an hour: seeds measured by an earlier invocation are taken from the results file, and the
    table is the mean and spread over all requested seeds (teachers: mean of M within a seed)."""

    quality, ran = fake_quality
    quality.main(["--seeds", "0", "--layers", "2", "--out", str(tmp_path / "a")])
    assert [o[2] for o in ran] == ["train.seed=0"]
    payload = quality.main(["--seeds", "0,1", "--layers", "2", "--out", str(tmp_path / "b")])
    assert [o[2] for o in ran] == ["train.seed=0", "train.seed=1"]  # seed 0 came from quality.json
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert sorted(saved["runs"]) == ["0", "1"]
    assert payload["table"]["teacher_dp"]["auc"]["mean"] == pytest.approx(0.715)  # (0.71 + 0.72) / 2
    assert payload["paired"]["student - student_plain"]["auc"]["mean"] == pytest.approx(0.04)
    assert payload["table"]["teacher_ensemble"]["seeds"] == [1]
    assert payload["paired"]["student - teacher_ensemble"]["seeds"] == [1]
    assert "teachers' mean score" in (tmp_path / "quality.md").read_text()
    quality.main(["--seeds", "0,1", "--layers", "2", "--out", str(tmp_path / "c"), "--fresh"])
    assert len(ran) == 4


def test_quality_students_of_other_sizes_link_their_seeds_teachers(tmp_path, fake_quality):
    """Each other student size runs once per seed with the seed's teachers linked; NewsBERT's 4-layer student is
    not run (6 teacher layers do not split into 4 blocks) and the table says so; reruns reuse every run."""

    from benchmarks.readme import quality as readme_quality

    quality, ran = fake_quality
    out = tmp_path / "a"
    payload = quality.main(["--seeds", "0,1", "--out", str(out)])
    assert len(ran) == 6
    for o in ran:
        layers = next((x for x in o if x.startswith("distill.student_layers=")), None)
        seed = o[2].split("=")[1]
        linked = [x for x in o if x.startswith("pipeline.teachers_from=")]
        assert linked == ([] if layers is None else [f"pipeline.teachers_from={out / f'seed_{seed}'}"])
        assert ("pipeline.newsbert=false" in o) == (layers == "distill.student_layers=4")
    t = payload["table"]
    assert t["student_l1"]["layers"] == 1 and t["student_l4"]["layers"] == 4 and t["student"]["layers"] == 2
    assert t["student_l4"]["auc"]["mean"] == pytest.approx(0.72) and "newsbert_student_l4" not in t
    assert "newsbert_student_l1" in t and "student_l1 - newsbert_student_l1" in payload["paired"]
    md = (tmp_path / "quality.md").read_text()
    assert "none: 6 teacher layers do not split into 4 blocks" in md
    assert "none: 6 teacher layers" in "".join(readme_quality(json.loads((tmp_path / "quality.json").read_text())))
    quality.main(["--seeds", "0,1", "--out", str(tmp_path / "b")])  # everything from the results file
    assert len(ran) == 6


def test_quality_kept_only_tabulates_what_exists_and_runs_nothing(tmp_path, fake_quality):
    """--kept-only re-derives the tables from the runs kept or committed and leaves out (naming) those not run yet:
    the seeds of a three-hour benchmark are measured across sessions."""
    quality, ran = fake_quality
    quality.main(["--seeds", "0", "--layers", "2", "--out", str(tmp_path / "a")])  # seed 0, 2 layers: committed
    assert len(ran) == 1
    payload = quality.main(["--seeds", "0,1", "--layers", "1,2", "--out", str(tmp_path / "a"), "--kept-only"])
    assert len(ran) == 1 and payload["seeds"] == [0] and "student_l1" not in payload["table"]
    assert payload["table"]["student"]["seeds"] == [0]
    with pytest.raises(SystemExit, match="no run"):
        quality.main(["--seeds", "1", "--out", str(tmp_path / "a"), "--kept-only"])
    assert len(ran) == 1


def test_quality_continues_a_run_interrupted_in_out_with_resume_auto(tmp_path, fake_quality):
    """A pipeline run stopped midway (its out_dir has a config.yaml, no quality_run.json) is run again with
    train.resume=auto, so its finished steps are kept; a fresh one is run without it."""
    quality, ran = fake_quality
    out = tmp_path / "a"
    (out / "seed_1").mkdir(parents=True)
    (out / "seed_1" / "config.yaml").write_text("train: {}\n")
    quality.main(["--seeds", "0,1", "--layers", "2", "--out", str(out)])
    assert ["train.resume=auto" in o for o in ran] == [False, True]
    quality.main(["--seeds", "0,1", "--layers", "2", "--out", str(out)])  # both finished now: reused
    assert len(ran) == 2


def test_tune_changes_one_knob_per_run_and_reports_time_to_the_speedup_target(tmp_path, monkeypatch):
    """The defaults' run and one run per other value of each knob, nothing else changed; times to the typical
    workflow's best AUC read from the speedup results; epochs counted in targets."""

    import benchmarks.common as common
    import benchmarks.tune as tune

    monkeypatch.setattr(tune, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "speedup.json").write_text(json.dumps({"target_auc": 0.70}))
    ran = {}

    def fake_run(name, overrides, root, timeout, may_run=True, committed=None):
        ran[name] = overrides
        better = "engine.random_negatives=popularity" in overrides
        curve = [{"step": i, "epoch": 0, "train_seconds": 10.0 * i, "clicks_trained": 50.0 * i,
                  "auc": 0.6 + (0.03 if better else 0.01) * i} for i in range(1, 5)]
        return {"curve": curve, "stats": {"clicks_in_data": 100, "clicks_per_second": 5.0}}

    monkeypatch.setattr(tune, "run_job_kept", fake_run)
    payload = tune.main(["--out", str(tmp_path / "runs")])
    base = ran["tune_defaults"]
    assert "train.epochs=2" in base and "train.workflow=speedyfeed" in base
    # the defaults of stage=finetune, every knob spelled out (auto resolved: linear decay, 4 negatives per click)
    assert {"engine.random_negatives=uniform", "train.lr_schedule=linear", "train.warmup_steps=0",
            "engine.negatives=4", "engine.inbatch_negatives=false"} <= set(base)
    changed = {name: sorted(set(o_) ^ set(base)) for name, o_ in ran.items()}
    assert changed == {"tune_defaults": [],
                       "tune_engine_random_negatives_popularity": ["engine.random_negatives=popularity",
                                                                   "engine.random_negatives=uniform"],
                       "tune_train_lr_schedule_constant": ["train.lr_schedule=constant", "train.lr_schedule=linear"],
                       "tune_train_warmup_steps_20": ["train.warmup_steps=0", "train.warmup_steps=20"],
                       "tune_engine_negatives_1": ["engine.negatives=1", "engine.negatives=4"],
                       "tune_engine_inbatch_negatives_true": ["engine.inbatch_negatives=false",
                                                              "engine.inbatch_negatives=true"]}
    pop = payload["summary"]["engine.random_negatives=popularity"]
    assert pop["seconds_to_target"] == 40.0 and pop["seconds_to_near_target"] == 40.0  # AUC 0.69 at 30 s, 0.72 at 40 s
    assert pop["best_at_epoch"] == 2.0 and pop["auc_after_one_epoch"] == pytest.approx(0.66)
    assert payload["summary"]["defaults"]["seconds_to_target"] is None
    assert pop["final_auc"] == pytest.approx(0.72) and pop["last_mean_auc"] == pytest.approx(0.675)  # 4 evaluations
    md = (tmp_path / "tune.md").read_text()
    assert "| engine.random_negatives=popularity |" in md
    assert "engine.random_negatives=popularity +5.00" in md  # last evaluations' mean: 0.675 against 0.625


def _fake_jobs(monkeypatch, tmp_path, module, result) -> list:
    """``module``'s results in tmp_path, and training jobs that run nothing: each makes its out_dir, records its
    name in the list returned and gives ``result(overrides)`` (through the real job.json keeping of
    run_job_kept)."""
    import benchmarks.common as common

    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ran = []

    def fake_run_job(name, overrides, root, timeout):
        ran.append(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        return result(overrides)

    monkeypatch.setattr(common, "run_job", fake_run_job)
    return ran


def test_tune_reuses_committed_runs_and_kept_only_names_the_knobs_not_run(tmp_path, monkeypatch):
    """A sweep made across sessions: --kept-only tabulates the runs made so far and names the rest; a new checkout
    (run folders gone) reuses the committed runs whose overrides match; nothing without the defaults' run."""
    import benchmarks.tune as tune

    curve = [{"train_seconds": 10.0 * i, "clicks_trained": 50.0 * i, "auc": 0.6 + 0.01 * i} for i in range(1, 4)]
    ran = _fake_jobs(monkeypatch, tmp_path, tune,
                     lambda overrides: {"curve": curve, "stats": {"clicks_in_data": 100, "clicks_per_second": 5.0}})
    with pytest.raises(SystemExit, match="defaults' run"):
        tune.main(["--quick", "--kept-only", "--out", str(tmp_path / "a")])
    tune.main(["--quick", "--out", str(tmp_path / "a")])
    assert len(ran) == 6
    (tmp_path / "tune_quick.json").unlink()
    for kept in ("tune_defaults", "tune_engine_negatives_1"):  # an interrupted sweep: two runs made
        (tmp_path / "b" / kept).mkdir(parents=True)
        (tmp_path / "b" / kept / "job.json").write_text((tmp_path / "a" / kept / "job.json").read_text())
    d = tune.main(["--quick", "--kept-only", "--out", str(tmp_path / "b")])
    assert len(ran) == 6 and list(d["summary"]) == ["defaults", "engine.negatives=1"]
    assert "Not run yet: engine.random_negatives=popularity, " in (tmp_path / "tune_quick.md").read_text()
    d = tune.main(["--quick", "--out", str(tmp_path / "c")])  # the two committed runs are reused, four made
    assert len(ran) == 10 and len(d["summary"]) == 6 and not d["not_run_yet"]


def test_cache_runs_every_gamma_per_seed_and_compares_the_ends_of_the_runs(tmp_path, monkeypatch):
    """One run per gamma and seed (gamma 0 without the cache, the others audited); best, final and the last 5
    evaluations' mean, averaged over seeds, and gamma 20 against 0 on each."""
    import benchmarks.cache as cache
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(cache, "RESULTS", tmp_path)
    ran = {}

    def fake_run(name, overrides, root, timeout, may_run=True, committed=None):
        ran[name] = overrides
        g = 20 if "engine.cache_gamma=20" in overrides else 0
        seed = 1 if "train.seed=1" in overrides else 0
        auc = [0.70, 0.80, 0.71, 0.72, 0.73, 0.74, 0.75] if g == 0 else [0.70, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76]
        auc = [a + 0.01 * seed for a in auc]
        stats = {"cache_hits": 1 if g else 0, "cache_lookups": 4 if g else 0, "wall_seconds": 10.0,
                 "clicks_per_second": 5.0, "news_encoded": 7}
        return {"curve": [{"auc": a, "train_seconds": i} for i, a in enumerate(auc)], "stats": stats,
                "metrics": {"auc": auc[-1]}}

    monkeypatch.setattr(cache, "run_job_kept", fake_run)
    (tmp_path / "speedup.json").write_text('{"target_auc": 0.72}')  # the typical workflow's best, timed to
    d = cache.main(["--gammas", "0,20,20d", "--seeds", "0,1", "--lr-multiple", "1", "--out", str(tmp_path / "runs")])
    assert d["summary"]["0"]["seconds_to_target"] == [1, 1] and d["summary"]["20"]["seconds_to_target"] == [2, 1]
    assert sorted(ran) == ["gamma_0", "gamma_0_seed1", "gamma_20", "gamma_20_seed1", "gamma_20d", "gamma_20d_seed1"]
    assert "engine.cache_deferred_grad=true" in ran["gamma_20d"]
    assert not any("deferred" in o for o in ran["gamma_20"] + ran["gamma_0"])
    assert "engine.cache=false" in ran["gamma_0"] and "engine.cache_audit=8" in ran["gamma_20_seed1"]
    assert "train.seed=1" in ran["gamma_20_seed1"] and not any(o.startswith("train.seed") for o in ran["gamma_20"])
    s0, s20 = d["summary"]["0"], d["summary"]["20"]
    assert s0["best_auc"] == pytest.approx(0.805) and s0["best_auc_std"] == pytest.approx(0.00707, abs=1e-4)
    assert s20["last_mean_auc"] == pytest.approx(0.745) and s20["hit_rate"] == 0.25
    assert d["gamma20_minus_gamma0_best_auc_points"] == pytest.approx(-4.0)  # 0.765 against 0.805
    assert d["gamma20_minus_gamma0_final_auc_points"] == pytest.approx(1.0)
    assert d["gamma20_minus_gamma0_last_mean_auc_points"] == pytest.approx(1.0)
    assert d["gamma20d_minus_gamma0_best_auc_points"] == pytest.approx(-4.0)  # the fake trains 20d as 20
    # paired per seed: seed 1 is seed 0 shifted by 0.01 for both gammas, so each seed's difference is the mean's
    assert d["gamma20_minus_gamma0_best_auc_points_by_seed"] == pytest.approx({"0": -4.0, "1": -4.0})
    md = (tmp_path / "cache.md").read_text()
    assert ("gamma = 20 against no cache, AUC points: best -4.00 (per seed -4.00, -4.00), final +1.00 (per seed "
            "+1.00, +1.00), last 5 +1.00 (per seed +1.00, +1.00); training seconds to the typical workflow's best "
            "AUC, median over the seeds that reach it: 2 against 1") in md
    assert "| 25.0% |" in md and "| 2 / 1 |" in md and "above the typical workflow's best dev AUC" in md
    assert "with deferred cache gradients (row 20d) against no cache, AUC points: best -4.00" in md
    assert "Row 20d: the same gamma with `engine.cache_deferred_grad=true`" in md


def test_cache_kept_only_tabulates_the_kept_runs_and_names_a_rows_seeds(tmp_path, monkeypatch):
    """--kept-only re-derives the table from the runs kept in --out (through the real job.json keeping) and runs
    nothing: a row kept for fewer seeds is labelled with them, and its gamma-20 pairing uses only the seeds both
    rows have."""
    import benchmarks.cache as cache

    def job(overrides):
        auc = 0.70 - (0.01 if "engine.cache_gamma=20" in overrides else 0.0) + (0.002 if "train.seed=1" in overrides else 0)
        stats = {"cache_hits": 1, "cache_lookups": 4, "wall_seconds": 10.0, "clicks_per_second": 5.0, "news_encoded": 7}
        return {"curve": [{"auc": auc, "train_seconds": 1.0}], "stats": stats, "metrics": {"auc": auc}}

    ran = _fake_jobs(monkeypatch, tmp_path, cache, job)
    out = ["--lr-multiple", "4", "--out", str(tmp_path / "runs")]
    cache.main(["--gammas", "0,20,0@1,20@1", "--seeds", "0", *out])
    cache.main(["--gammas", "0,20,0@1", "--seeds", "0,1", *out])
    assert len(ran) == len(set(ran)) == 7  # each run once
    d = cache.main(["--gammas", "0,20,0@1,20@1", "--seeds", "0,1,2", "--kept-only", *out])
    assert len(ran) == 7 and d["seeds"] == [0, 1]
    assert d["summary"]["20"]["seeds"] == ["0", "1"] and d["summary"]["20@1"]["seeds"] == ["0"]
    assert d["gamma20@1_minus_gamma0@1_best_auc_points_by_seed"] == pytest.approx({"0": -1.0})
    assert d["gamma20@1_minus_gamma0@1_best_auc_points"] == pytest.approx(-1.0)  # on seed 0: not 0.69 - 0.701
    md = (tmp_path / "cache.md").read_text()
    assert "| 20@1 (seed 0) |" in md and "| 20 |" in md
    assert "at the same learning rates (seed 0 only), AUC points: best -1.00" in md
    with pytest.raises(SystemExit, match="no run kept"):
        cache.main(["--gammas", "30", "--kept-only", *out])


def test_cache_rows_at_other_learning_rates_are_compared_with_no_cache_at_theirs(tmp_path, monkeypatch):
    """A row G@M trains at learning rates M times the defaults, and its gamma-20 row is paired with the no-cache
    row of the same rates (not with the benchmark's own); a malformed row is refused before anything runs."""
    import benchmarks.cache as cache
    import benchmarks.common as common
    from benchmarks.speedup import lr_overrides

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(cache, "RESULTS", tmp_path)
    ran = {}

    def fake_run(name, overrides, root, timeout, may_run=True, committed=None):
        ran[name] = overrides
        auc = 0.70 + (0.05 if lr_overrides(2)[0] in overrides else 0.0) - (0.01 if "engine.cache_gamma=20" in overrides else 0.0)
        stats = {"cache_hits": 1, "cache_lookups": 4, "wall_seconds": 10.0, "clicks_per_second": 5.0, "news_encoded": 7}
        return {"curve": [{"auc": auc, "train_seconds": 1}], "stats": stats, "metrics": {"auc": auc}}

    monkeypatch.setattr(cache, "run_job_kept", fake_run)
    d = cache.main(["--gammas", "0,20,0@2,20@2.0", "--lr-multiple", "1", "--out", str(tmp_path / "runs")])
    assert sorted(ran) == ["gamma_0", "gamma_0_lr2", "gamma_20", "gamma_20_lr2"]
    assert lr_overrides(2)[0] in ran["gamma_20_lr2"] and lr_overrides(1)[0] in ran["gamma_20"]
    assert d["gamma20@2_minus_gamma0@2_final_auc_points"] == pytest.approx(-1.0)  # not 20@2 against 0: +4
    assert d["gamma20_minus_gamma0_final_auc_points"] == pytest.approx(-1.0)
    md = (tmp_path / "cache.md").read_text()
    assert "gamma = 20 at learning rates x2 (row 20@2) against no cache at the same learning rates" in md
    assert "Rows 0@2, 20@2: G@M is gamma G at learning rates M times the defaults" in md
    for bad in ("20@0", "x", "20@a", "20x@1", "0e", "20ed", "20e"):  # 20e alone: rows 0 and 20 time it
        with pytest.raises(SystemExit):
            cache.main(["--gammas", bad, "--out", str(tmp_path / "bad")])
    assert sorted(ran) == ["gamma_0", "gamma_0_lr2", "gamma_20", "gamma_20_lr2"]


def test_cache_equal_time_row_trains_for_the_no_cache_rows_time_and_committed_runs_are_reused(tmp_path, monkeypatch):
    """Row 20e runs after rows 0 and 20 of every seed, for as many steps as gamma 20 takes in the time no cache took
    (the median over seeds of the time ratio, so one slowed run does not decide it; a finished run keeps its length
    when a seed added later moves the median), and is paired with no cache; a run in the committed results with
    the same overrides is reused rather than run again (a table measured across sessions), unless --fresh."""

    import benchmarks.cache as cache

    def job(overrides):
        g0 = "engine.cache=false" in overrides
        steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.max_steps=")), 100)
        auc = 0.70 if g0 else 0.69 + 0.0001 * (steps - 100)
        slowed = 2 if "train.seed=1" in overrides else 1  # seed 1's no-cache run met a busy machine
        stats = {"cache_hits": 0 if g0 else 1, "cache_lookups": 0 if g0 else 4, "clicks_per_second": 5.0,
                 "news_encoded": 7, "steps": steps, "wall_seconds": 30.0 * slowed if g0 else 0.2 * steps}
        return {"curve": [{"auc": auc, "train_seconds": 1.0}], "stats": stats, "metrics": {"auc": auc}}

    ran = _fake_jobs(monkeypatch, tmp_path, cache, job)
    out = ["--lr-multiple", "4", "--out", str(tmp_path / "runs")]
    d = cache.main(["--gammas", "20e,20,0", "--seeds", "0,2", *out])
    # the equal-time rows after the rows that time them
    assert ran == ["gamma_20", "gamma_0", "gamma_20_seed2", "gamma_0_seed2", "gamma_20e", "gamma_20e_seed2"]
    kept = json.loads((tmp_path / "runs" / "gamma_20e" / "job.json").read_text())["overrides"]
    assert "train.max_steps=150" in kept and "train.epochs=2" in kept and "train.epochs=1" not in kept
    assert "engine.cache_gamma=20" in kept  # 100 steps took 20 s, no cache 30 s: 150 steps
    assert d["gamma20e_minus_gamma0_final_auc_points"] == pytest.approx(-0.5)
    assert d["gamma20_minus_gamma0_final_auc_points"] == pytest.approx(-1.0) and d["equal_time_ratio"] == {"20e": 1.5}
    # seed 1 (ratio 3) joins: the median of 1.5, 3 and 1.5 stays 1.5; with seed 0 alone against it, it would be 2.25
    d = cache.main(["--gammas", "0,20,20e", "--seeds", "0,1,2", *out])
    assert ran[6:] == ["gamma_0_seed1", "gamma_20_seed1", "gamma_20e_seed1"] and d["equal_time_ratio"] == {"20e": 1.5}
    assert "train.max_steps=150" in d["runs"]["20e"]["1"]["overrides"]
    d = cache.main(["--gammas", "0,20,20e", "--seeds", "0,1", *out])  # median 2.25: seed 0's run keeps its 150
    assert len(ran) == 9 and d["equal_time_ratio"] == {"20e": 2.25}
    assert "train.max_steps=150" in d["runs"]["20e"]["0"]["overrides"]
    md = (tmp_path / "cache.md").read_text()
    assert "gamma = 20 trained for no cache's time (row 20e) against no cache, AUC points: best -0.50" in md
    assert "Row 20e: the same gamma trained for the time the no-cache row took" in md
    # a new checkout: the run folders are gone, the committed results are not
    out = ["--lr-multiple", "4", "--out", str(tmp_path / "new")]
    d2 = cache.main(["--gammas", "0,20,20e", "--seeds", "0,1", *out])
    assert len(ran) == 9 and d2["summary"] == d["summary"]
    d3 = cache.main(["--gammas", "0,20,20e,30", "--seeds", "0", "--kept-only", *out])
    assert len(ran) == 9 and list(d3["summary"]) == ["0", "20", "20e"]
    cache.main(["--gammas", "0", "--seeds", "0", "--fresh", *out])
    assert ran[9:] == ["gamma_0"]


def test_cache_paired_differences_follow_each_seed():
    """The per-seed difference pairs each gamma-20 run with the no-cache run of its own seed, so a seed that is
    good for both does not hide a cost on another; seeds only one side ran are left out of the pairs."""
    from benchmarks.cache import gamma20_vs_gamma0, summarize

    def job(final):
        return {"curve": [{"auc": final, "train_seconds": 1}], "metrics": {"auc": final},
                "stats": {"cache_hits": 0, "cache_lookups": 0, "wall_seconds": 1.0, "clicks_per_second": 1.0,
                          "news_encoded": 1}}

    runs = {"0": {"0": job(0.75), "1": job(0.70), "2": job(0.72)}, "20": {"0": job(0.74), "1": job(0.70)}}
    d = gamma20_vs_gamma0(summarize(runs), runs)
    assert d["gamma20_minus_gamma0_final_auc_points_by_seed"] == pytest.approx({"0": -1.0, "1": 0.0})
    # the headline is the mean over the pairs, not 0.72 - 0.7233 (a mean that includes seed 2, which gamma 20 lacks)
    assert d["gamma20_minus_gamma0_final_auc_points"] == pytest.approx(-0.5)
    assert "gamma20d_minus_gamma0_final_auc_points" not in d


def test_a_kept_run_is_not_reused_after_a_default_changed(tmp_path):
    """run_job_kept compares the kept run's saved config with what its overrides give today: the same overrides
    under another default (here the schedule a run of the old default saved) are refused, not silently reused."""

    from benchmarks.common import changed_defaults, run_job_kept
    from speedyrec.config import dump_config, load_config

    overrides = ["data.synthetic_users=300"]
    run = tmp_path / "r"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"overrides": overrides}))
    dump_config(load_config(overrides=[*overrides, f"out_dir={run}", "train.log_every=0"]), run / "config.yaml")
    assert changed_defaults(run, overrides) == []
    assert run_job_kept("r", overrides, tmp_path) == {"overrides": overrides}
    dump_config(load_config(overrides=[*overrides, f"out_dir={run}", "train.log_every=0", "train.lr_schedule=constant"]),
                run / "config.yaml")
    assert changed_defaults(run, overrides) == ["train.lr_schedule: 'constant' -> 'linear'"]
    with pytest.raises(SystemExit, match="other defaults.*train.lr_schedule"):
        run_job_kept("r", overrides, tmp_path)
    # a key the kept run's version did not have: an off switch changes nothing, any other value is a difference
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["lr_schedule"] = "linear"
    del saved["engine"]["cache_deferred_grad"], saved["engine"]["cache_gamma"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_defaults(run, overrides) == ["engine.cache_gamma: None -> 20"]
    del saved["engine"]["inbatch_negatives"]
    saved["engine"]["cache_gamma"] = 20
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_defaults(run, overrides) == []
    assert changed_defaults(run, [*overrides, "engine.inbatch_negatives=true"]) == ["engine.inbatch_negatives: None -> True"]
    # a finetune run never reads the distillation sections: an option added there since does not void it (the
    # main job's timing ignores them too), while a distillation stage's run compares them
    del saved["distill"]["stage1_projections"]
    saved["posttrain"]["news"] = "train"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_defaults(run, overrides) == []
    # a key added since, at the value that does what runs without it did (AS_BEFORE), is no difference either
    # (a run without engine.targets trained every click: today's default, impressions, differs; named, it does not)
    del saved["engine"]["targets"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert changed_defaults(run, overrides) == ["engine.targets: None -> 'impressions'"]
    assert changed_defaults(run, [*overrides, "engine.targets=all"]) == []
    other_stage = changed_defaults(run, [*overrides, "stage=posttrain"])
    assert {"distill.stage1_projections: None -> True", "posttrain.news: 'train' -> 'all'"} <= set(other_stage)


def test_a_benchmark_longer_than_a_session_continues_from_its_committed_ledger(tmp_path, monkeypatch):
    """run_job_kept(ledger=NAME) records every finished run in results/ledger/NAME.json at once; a later session
    (another --out, the run folders gone) reuses it through committed_runs, unless the job's recorded config says
    it ran under other defaults: then it runs again."""
    from benchmarks import common
    from speedyrec.config import flat_config, load_config

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    ran = []

    def fake_run_job(name, overrides, out_root, **kw):
        ran.append(name)
        (out_root / name).mkdir(parents=True)
        cfg = load_config(overrides=[f"out_dir={out_root / name}", "train.log_every=0", *overrides]).to_dict()
        return {"name": name, "stats": {"steps": len(ran)}, "commit": "abc", "config": cfg}

    monkeypatch.setattr(common, "run_job", fake_run_job)
    overrides = ["data.synthetic_users=300"]
    first = common.run_job_kept("a", overrides, tmp_path / "session1", ledger="bench")
    assert ran == ["a"] and common.ledger_runs("bench") == {"a": first}
    # the next session: a fresh --out, the ledger committed
    committed = common.committed_runs("bench")
    assert common.run_job_kept("a", overrides, tmp_path / "session2", committed=committed.get("a"),
                               ledger="bench") == first
    assert ran == ["a"]
    # a default changed since the committed run: it is run again, and the ledger holds the new run
    stale = {**first, "config": load_config(overrides=[*overrides, "train.lr_schedule=constant"]).to_dict()}
    again = common.run_job_kept("a", overrides, tmp_path / "session3", committed=stale, ledger="bench")
    assert ran == ["a", "a"] and common.ledger_runs("bench")["a"] == again
    assert flat_config(again["config"])["train.lr_schedule"] == "linear"
    # other overrides that resolve to the same settings are the same run (a default that changed is named); a key
    # resolved at run time set otherwise is not, nor are settings that differ
    named = [*overrides, "train.lr_schedule=linear"]
    assert common.run_job_kept("a", named, tmp_path / "named", committed=again) == again and len(ran) == 2
    common.run_job_kept("a", [*named, "train.amp=auto"], tmp_path / "amp", committed=again)
    common.run_job_kept("a", [*overrides, "train.lr_schedule=constant"], tmp_path / "other", committed=again)
    assert ran == ["a"] * 4
    # other overrides are another run; --fresh ignores the ledger; a finished benchmark clears it
    assert common.committed_runs("bench", fresh=True) == {}
    common.write_results("bench", {"runs": {}}, "")  # results that miss a ledger run leave the ledger
    assert common.ledger_runs("bench") == {"a": again}
    common.write_results("bench", {"runs": {"a": again}}, "")  # results that hold every run clear it
    assert common.ledger_runs("bench") == {} and common.committed_runs("bench") == {"a": again}
    # a STOP file in --out ends the benchmark before its next new run; kept and committed runs still count
    (tmp_path / "session4").mkdir()
    (tmp_path / "session4" / "STOP").touch()
    assert common.run_job_kept("a", overrides, tmp_path / "session4", committed=again) == again
    with pytest.raises(SystemExit, match="STOP exists: stopped before b"):
        common.run_job_kept("b", overrides, tmp_path / "session4", ledger="bench")
    assert ran == ["a"] * 4


def test_limit_and_data_efficiency_draw_their_plots(tmp_path):
    """The two tables without training runs draw a figure too (skipped where the [bench] extra is missing)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from benchmarks import data_efficiency, limit

    limit.plot(tmp_path / "limit.png", {"engine_useful_tokens_per_second": 90.0, "raw_tokens_per_second": 100.0,
                                        "engine_fraction_of_limit": 0.9})
    r = {"data_efficiency": 0.5}
    data_efficiency.plot(tmp_path / "de.png", {"runs": {"titles": {"variants": {"fixed padding": r}, "best": r},
                                                        "buslm": {"variants": {"both (default)": r}, "best": r}}})
    assert (tmp_path / "limit.png").stat().st_size > 0 and (tmp_path / "de.png").stat().st_size > 0


def test_times_are_read_from_a_running_mean_of_three_evaluations():
    """One lucky evaluation does not make a crossing: the running mean must reach the target."""
    from benchmarks.speedup import best_smoothed, seed_comparison, smoothed, smoothed_seconds_to

    curve = lambda aucs: {"curve": [{"train_seconds": 10.0 * (i + 1), "auc": a} for i, a in enumerate(aucs)],  # noqa: E731
                          "stats": {"clicks_not_reached": 0}}
    lucky = curve([0.60, 0.70, 0.60, 0.64, 0.66, 0.68])
    assert [round(a, 4) for _, a in smoothed(lucky)] == [0.6333, 0.6467, 0.6333, 0.66]
    assert seconds_to(lucky, 0.70) == 20.0 and smoothed_seconds_to(lucky, 0.65) == 60.0
    assert best_smoothed(lucky) == pytest.approx(0.66) and best_smoothed(curve([0.7, 0.7])) is None
    typical = curve([0.60, 0.62, 0.64, 0.65, 0.66, 0.66, 0.65])  # best running mean 0.6567, reached at 60 s
    fast = curve([0.64, 0.66, 0.68, 0.60])  # the mean reaches it at 30 s
    c = seed_comparison(typical, fast)
    assert c["target_auc"] == pytest.approx((0.65 + 0.66 + 0.66) / 3)
    assert c["seconds_to_target"] == {"typical": 60.0, "speedyfeed": 30.0} and c["speedup"] == pytest.approx(2.0)
    assert c["raw"]["target_auc"] == 0.66 and c["raw"]["speedup"] == pytest.approx(50.0 / 20.0)
    slow = curve([0.60, 0.61, 0.62])
    assert seed_comparison(typical, slow)["speedup"] is None


def test_the_learning_rate_sweep_grows_past_an_edge_where_the_best_lies():
    """sweep_choice: an interior best is chosen as is; a best at the grid's edge grows the grid by 4x that way (at
    most EXTEND times); a missing run says what is needed next instead of choosing."""
    from benchmarks.speedup import EXTEND, sweep_choice

    def curve(peak):  # a score peaking at multiple `peak`
        return lambda m: -abs(__import__("math").log(m / peak))

    assert sweep_choice(curve(4), [1, 4, 16]) == (4.0, [1.0, 4.0, 16.0])
    assert sweep_choice(curve(64), [1, 4, 16]) == (64.0, [1.0, 4.0, 16.0, 64.0, 256.0])
    assert sweep_choice(curve(0.25), [1, 4, 16]) == (0.25, [0.0625, 0.25, 1.0, 4.0, 16.0])
    assert EXTEND == 2 and sweep_choice(curve(1e6), [1, 4, 16])[0] == 256.0  # grown twice, then the edge stands
    scores = {1.0: 0.70, 4.0: 0.72, 16.0: 0.73}
    assert sweep_choice(scores.get, [1, 4, 16]) == (None, [1.0, 4.0, 16.0, 64.0])


def test_the_speedup_sweep_runs_the_grown_grid_for_each_workflow(tmp_path, monkeypatch):
    """benchmarks.speedup --sweep-only: each workflow's grid grows on its own where its best lies at an edge, and
    only there (the same rule for both; typical's best interior at x4 here, speedyfeed's past the grid's top)."""
    import math

    import benchmarks.speedup as sp

    ran = []

    def fake_run(name, overrides, root, may_run=True, committed=None, timeout=0, ledger=""):
        ran.append(name)
        m = float(name.split("_lr")[1].split("_")[0])
        peak = 4.0 if name.startswith("typical") else 32.0
        auc = 0.7 - 0.01 * abs(math.log(m / peak))
        return {"curve": [{"train_seconds": i, "auc": auc} for i in range(3)]}

    monkeypatch.setattr(sp, "run_job_kept", fake_run)
    out = sp.main(["--quick", "--sweep-only", "--out", str(tmp_path)])
    assert out["best_lr_multiple"] == {"typical": 4.0, "speedyfeed": 16.0}
    assert sorted(out["lr_sweep_scores"]["typical"]) == [1.0, 4.0, 16.0]
    assert sorted(out["lr_sweep_scores"]["speedyfeed"]) == [1.0, 4.0, 16.0, 64.0]
    assert len(ran) == len(set(ran)) == 7  # each run once


def test_the_speedup_report_times_each_arm_against_the_same_typical_runs(tmp_path, monkeypatch):
    """benchmarks.speedup end to end on fake runs: the headline is the arm the defaults train (impression targets),
    with its own sweep by the same rule, its own headline runs (engine.targets=impressions) and its speedup against
    the typical runs; the every-click arm (engine.targets=all), which never reaches typical's best running mean
    here, is reported as not reached, with both bests, against the same typical runs."""
    import math

    import benchmarks.common as common
    import benchmarks.speedup as sp

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    ran = {}

    def fake_run(name, overrides, root, may_run=True, committed=None, timeout=0, ledger=""):
        ran[name] = overrides
        assert "train.workflow=typical" in overrides or any(o.startswith("engine.targets=") for o in overrides)
        arm = sp.IMPRESSIONS if "engine.targets=impressions" in overrides else (
            "typical" if "train.workflow=typical" in overrides else "speedyfeed")
        top, dt, rate_ = {"typical": (0.74, 10.0, 5.0), "speedyfeed": (0.73, 1.0, 200.0),
                          sp.IMPRESSIONS: (0.75, 2.0, 40.0)}[arm]
        m = float(name.split("_lr")[1].split("_")[0]) if "_lr" in name else 4.0
        top -= 0.01 * abs(math.log(m / 4.0))  # every arm's sweep peaks at x4 (grown past the quick grid's edge)
        curve = [{"train_seconds": dt * (i + 1), "auc": top - 0.05 / (i + 1), "step": i + 1} for i in range(8)]
        stats = {"clicks_per_second": rate_, "clicks_in_data": 1000 if arm == "speedyfeed" else 100,
                 "clicks_not_reached": 0, "steps": 8, "wall_seconds": 8 * dt, "clicks_trained": rate_ * 8 * dt,
                 "data_efficiency": 0.9, "news_encoded": 10, "cache_hits": 1, "cache_lookups": 2, "precision": "bf16"}
        return {"curve": curve, "stats": stats}

    monkeypatch.setattr(sp, "run_job_kept", fake_run)
    monkeypatch.setattr(sp, "default_negatives", lambda: 4)
    d = sp.main(["--quick", "--out", str(tmp_path / "out")])
    every = d["all_click_targets"]
    assert every["time_to_auc_speedup_seeds"] == [None, None] and every["time_to_auc_speedup_smoothed"] is None
    assert d["headline_arm"] == sp.IMPRESSIONS
    imp = d
    # typical's best running mean (0.7328) is reached at its 8th evaluation (80 s), the arm's at its 5th (10 s)
    assert imp["time_to_auc_speedup_seeds"] == [pytest.approx(8.0)] * 2 and imp["time_to_auc_speedup_smoothed"] == 8.0
    assert imp["epoch_speedup"] == pytest.approx((100 / 5.0) / (100 / 40.0))
    assert d["best_lr_multiple"][sp.IMPRESSIONS] == d["headline_lr_multiple"]
    assert sp.chosen_multiples(quick=True) == {"typical": 4.0, "speedyfeed": 4.0}
    arm_runs = [n for n in ran if n.startswith(sp.IMPRESSIONS)]
    assert {n for n in arm_runs if "_steps" in n} == {f"{sp.IMPRESSIONS}_lr{m:g}_steps12" for m in (1, 4, 16)}
    assert all("engine.targets=impressions" in ran[n] for n in arm_runs) and len(arm_runs) == 3 + 2
    md = (tmp_path / "results" / "speedup_quick.md").read_text()
    assert "every click a target (engine.targets=all) did not reach the typical workflow's best running mean" in md
    assert "0.7228 against typical's 0.7328" in md
    assert "speedyfeed (its defaults: impression targets) reaches" in md and "**8.0x sooner**" in md


def test_where_it_pays_tabulates_per_target_and_per_epoch_speedups(tmp_path, monkeypatch):
    """Every point of the grid gets its rates and epoch times; time to quality at the ends of the history sweep."""
    import benchmarks.common as common
    import benchmarks.where_it_pays as wip

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ran = []

    def fake_run(name, overrides, root, may_run=True, committed=None, timeout=0, ledger=""):
        ran.append((name, overrides))
        hist = int(next(o for o in overrides if o.startswith("data.synthetic_history_mean=")).split("=")[1])
        typical = "train.workflow=typical" in overrides
        stats = {"clicks_per_second": 2.0 if typical else 20.0 * (1 + hist / 50),
                 "clicks_in_data": 1000 if typical else 1000 * (1 + hist / 10), "valid_tokens": 600,
                 "news_encoded": 40}
        aucs = [0.60, 0.62, 0.63, 0.63] if typical else [0.62, 0.64, 0.64, 0.64]
        return {"stats": stats, "curve": [{"train_seconds": (100.0 if typical else 10.0) * (i + 1), "auc": a}
                                          for i, a in enumerate(aucs)]}

    monkeypatch.setattr(wip, "run_job_kept", fake_run)
    # before the speedup benchmark's sweep has chosen the learning rates: the rate grid, no time to quality
    d = wip.main(["--out", str(tmp_path / "runs"), "--users", "100"])
    assert len(d["points"]) == len(wip.HISTORIES) * len(wip.TEXTS) and d["time_to_quality"] == {}
    assert not any(n.startswith("quality_") for n, _ in ran) and "waits for its learning-rate sweep" in (
        tmp_path / "where_it_pays.md").read_text()
    # the sweep's runs in the speedup ledger (the headline still running): the chosen rates are used

    from benchmarks.speedup import FULL

    def sweep_job(aucs):
        return {"curve": [{"train_seconds": i, "auc": a} for i, a in enumerate(aucs)]}

    steps = FULL["sweep_steps"]
    assert FULL["lrs"] == (1.0, 4.0, 16.0)
    sf = "speedyfeed_impressions"  # the arm speedyfeed's defaults train
    ledger = {f"typical_lr1_steps{steps}": sweep_job([0.6, 0.61, 0.62]), f"typical_lr4_steps{steps}": sweep_job([0.5] * 3),
              f"{sf}_lr1_steps{steps}": sweep_job([0.6] * 3), f"{sf}_lr4_steps{steps}": sweep_job([0.7] * 3)}
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "speedup.json").write_text(json.dumps({"runs": ledger}))
    ran.clear()
    d = wip.main(["--out", str(tmp_path / "runs"), "--users", "100"])  # x16 not run yet: the sweep is not done
    assert d["time_to_quality"] == {} and not any(n.startswith("quality_") for n, _ in ran)
    ledger.update({f"typical_lr16_steps{steps}": sweep_job([0.55] * 3), f"{sf}_lr16_steps{steps}": sweep_job([0.65] * 3)})
    (tmp_path / "ledger" / "speedup.json").write_text(json.dumps({"runs": ledger}))
    ran.clear()
    d = wip.main(["--out", str(tmp_path / "runs"), "--users", "100"])  # typical's best at x1, the grid's edge: x0.25 runs next
    assert d["time_to_quality"] == {}
    ledger[f"typical_lr0.25_steps{steps}"] = sweep_job([0.58] * 3)
    (tmp_path / "ledger" / "speedup.json").write_text(json.dumps({"runs": ledger}))
    ran.clear()
    d = wip.main(["--out", str(tmp_path / "runs"), "--users", "100"])
    assert d["lr_multiple"] == {"typical": 1.0, "speedyfeed": 4.0}
    quality = [o for n, o in ran if n.startswith("quality_")]
    assert len(quality) == 4 and all(("train.lr=0.0004" in o) == ("train.workflow=speedyfeed" in o) for o in quality)
    assert len(d["points"]) == len(wip.HISTORIES) * len(wip.TEXTS)
    p10 = next(p for p in d["points"] if p["history_mean"] == 10 and p["text"] == "titles")
    assert p10["per_target_speedup"] == pytest.approx(12.0) and p10["epoch_speedup"] == pytest.approx(12.0 / 2.0)
    assert p10["targets_per_user"] == pytest.approx(20.0)
    assert set(d["time_to_quality"]) == {"10", "100"} and d["time_to_quality"]["10"]["time_to_auc_speedup"] > 1
    assert (tmp_path / "where_it_pays.md").read_text().count("|") > 20


def test_multiteacher_reports_the_bound_the_repeats_and_memory(tmp_path, monkeypatch):
    """The finetuning bound comes from the benchmark's own runs (one teacher with and without its top layers),
    Stage II's ratio from repeats paired with the student's runs of the same round, and a ratio is called
    distinguishable from 1.00 only when every repeat lies on one side of it."""
    from benchmarks import common, multiteacher

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(multiteacher, "_plot", lambda *a, **k: None)

    def c(seconds, steps=30, bank=0.0, rss=1000.0):
        return {"loop_seconds": seconds, "steps": steps, "clicks_trained": 1, "bank_seconds": bank,
                "bank_news_encoded": 10, "shared_frozen_layers": 3, "peak_rss_mb": rss, "train_peak_rss_mb": rss - 100,
                "process_seconds": seconds + 5, "command": "x"}

    runs = {"finetune_ours_1": c(100), "finetune_ours_1_no_top": c(20)}
    for m in range(1, 5):
        runs[f"finetune_ours_{m}"] = runs.get(f"finetune_ours_{m}") or c(100 + 85 * (m - 1))
        runs[f"finetune_naive_single_{m}"] = c(60, steps=12)
        runs[f"stage2_naive_{m}"] = c(50 * m, steps=12)
    students = [400.0, 440.0, 420.0]
    for r, s in enumerate(students):
        runs[f"student_r{r}"] = c(s, steps=135)
        for m in range(1, 5):
            # M = 1 costs 0.95-1.02x its round's student (straddles 1.00); M = 4 costs more than every student
            runs[f"stage2_ours_{m}_r{r}"] = c(s * (0.95 + 0.035 * r) if m == 1 else s * 1.05 + 20 * m, steps=135,
                                              bank=5.0 * m, rss=1000.0 + 50 * m)
    d = multiteacher.report(runs, 4, 0, 12, {"device": "cpu", "torch": "x"}, quick=False, repeats=3)
    assert d["finetune_m4_bound"] == pytest.approx(0.2 + 4 * 0.8)
    assert d["finetune_m4_over_one"] == pytest.approx(355 / 100)
    assert d["finetune_m4_over_bound"] == pytest.approx(3.55 / 3.4)
    reps = d["stage2_m4_over_student_repeats"]
    assert reps == pytest.approx([(s * 1.05 + 80 + 20) / s for s in students])
    assert d["stage2_m4_over_student"] == pytest.approx(sorted(reps)[1])
    one = d["stage2"][0]
    assert one["ours_over_student_repeats"] == pytest.approx([0.95 + 5 / 400, 0.985 + 5 / 440, 1.02 + 5 / 420])
    assert not one["distinguishable_from_one"] and d["stage2"][3]["distinguishable_from_one"]
    assert d["stage2_peak_rss_mb"] == {"1": 1050.0, "2": 1100.0, "3": 1150.0, "4": 1200.0}
    assert d["bank_seconds"] == {"1": 5.0, "2": 10.0, "3": 15.0, "4": 20.0}
    assert d["stage2_m4_peak_rss_over_m1"] == pytest.approx(1200 / 1050)
    md = (tmp_path / "multiteacher.md").read_text()
    assert "0.20 + M x 0.80" in md and "| 4 | 355 | 3.55x | 3.40x | 1.04 |" in md
    from benchmarks import readme  # the README's section reads the same payload

    section = "\n".join(readme.multiteacher(json.loads((tmp_path / "multiteacher.json").read_text())))
    assert "3 interleaved runs" in section and "1.04x its bound" in section and "| Stage II peak resident" in section


def test_batched_top_layers_compute_what_the_sequential_layers_do_and_are_reported(tmp_path, monkeypatch):
    """The batched-teachers experiment times the same arithmetic in every variant (the vmap variant's output is
    checked against the engine's sequential layers inside measure), and multiteacher.md states its verdict from
    the figures: a batched variant is called faster only when its median is below the sequential one's."""
    from transformers import BertConfig

    from benchmarks import batched_layers, multiteacher

    cfg = BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    b = batched_layers.measure(cfg, 2, 2, 64, 8, repeats=1, warmup=0)
    assert b["rows"] == 8 and b["tokens"] == 64
    for p in ("fp32", "bf16"):
        assert len(b[p]["vmap_over_sequential_repeats"]) == 1
        assert b[p]["vmap_over_sequential"] == pytest.approx(b[p]["vmap_ms"] / b[p]["sequential_ms"])
        assert ("vmap_over_sequential" in b[p]["faster"]) == (b[p]["vmap_over_sequential"] < 1.0)
    slower = {**b, "batched_faster": False}
    for p in ("fp32", "bf16"):  # bmm faster in one round of two: not counted as faster
        slower[p] = {**b[p], "vmap_over_sequential_repeats": [1.4, 1.5], "bmm_over_linears_repeats": [0.9, 1.1],
                     "faster": [], "linears_share": 0.27, "bmm_saves_at_most": 0.01}
    md = "\n".join(multiteacher._batched_md(slower))
    assert "keeps its M sequential calls" in md and "| fp32 |" in md and "1.45 (1.40-1.50)" in md and "| 27% |" in md

    real_vmap = torch.func.vmap  # a vmap variant that computed something else is refused, not timed
    monkeypatch.setattr(torch.func, "vmap", lambda fn, **kw: (lambda *a: real_vmap(fn, **kw)(*a) + 1.0))
    with pytest.raises(AssertionError, match="does not compute"):
        batched_layers.measure(cfg, 2, 2, 64, 8, repeats=1, warmup=0)


def test_multiteacher_compares_a_student_and_stage_ii_that_train_alike():
    """The student alone and Stage II differ only by the teachers: every engine and training setting resolves alike
    (a default that differs by stage, as engine.targets does, would compare runs of different lengths)."""
    from benchmarks.multiteacher import BASE
    from speedyrec.config import load_config

    student = load_config(None, [*BASE, "stage=finetune", "model.layers=2", "model.freeze_layers=0"]).to_dict()
    stage2 = load_config(None, [*BASE, "stage=distill_finetune"]).to_dict()
    for section in ("engine", "train"):
        differ = {k: (v, stage2[section][k]) for k, v in student[section].items() if stage2[section][k] != v}
        if section == "train":  # each stage's own learning rates: they change what is learnt, not the cost
            differ.pop("lr", None)
            differ.pop("encoder_lr", None)
        assert not differ, (section, differ)


def test_frozen_cache_epoch_rates_are_per_epoch_medians_without_each_epochs_first_window():
    from benchmarks.frozen_cache import epoch_rates

    log = [{"epoch": 0, "targets_per_second": v} for v in (10.0, 100.0, 200.0, 300.0)]
    log += [{"epoch": 1, "targets_per_second": v} for v in (50.0, 400.0, 500.0)]
    log += [{"epoch": 2, "targets_per_second": v} for v in (7.0, 9.0)]  # two windows: both kept
    assert epoch_rates({"log": log}) == [200.0, 450.0, 8.0]


def test_chunk_tokens_auto_follows_the_device():
    import torch

    from speedyrec.engine.encode import CPU_CHUNK_TOKENS, GPU_CHUNK_TOKENS, auto_chunk_tokens

    assert auto_chunk_tokens(torch.device("cpu")) == CPU_CHUNK_TOKENS == 2048
    assert auto_chunk_tokens(torch.device("cuda", 0)) == GPU_CHUNK_TOKENS > 16 * CPU_CHUNK_TOKENS


def test_tree_tensor_bytes_counts_the_tensors_under_one_key_of_a_saved_tree(tmp_path):
    import numpy as np
    import torch

    from benchmarks.scale import tree_tensor_bytes
    from speedyrec.engine.safe_io import save_tree

    tree = {"model": {"w": torch.zeros(10), "b": torch.zeros(2, dtype=torch.bfloat16)},
            "workflow_cache": {"emb": torch.zeros(2, 3), "rows": np.arange(3, dtype=np.int64), "shape": (2, 3)}}
    st, js = save_tree(tree, tmp_path / "model")
    assert tree_tensor_bytes(js, st, "workflow_cache") == 6 * 4 + 3 * 8
    assert tree_tensor_bytes(js, st, "model") == 10 * 4 + 2 * 2
    assert tree_tensor_bytes(js, st, "absent") == 0


@pytest.mark.parametrize("reader", ["pyarrow", "polars"])
def test_a_columnar_parse_equals_our_readers_arrays(tmp_path, reader):
    """benchmarks.columnar times pyarrow and polars against our reader only after their arrays equal ours; this
    checks the two parses on a MIND-large-shaped log (empty histories, one and two clicks, AM/PM stamps)."""
    pytest.importorskip(reader)
    from benchmarks import columnar
    from benchmarks.scale import generate
    from speedyrec.data.faults import FaultLog
    from speedyrec.data.news import NewsTable, read_mind_news

    generate(tmp_path, 400, 300, seed=3)
    path = tmp_path / "train" / "behaviors.tsv"
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    for cols in lines[::7]:  # MIND has users without a history
        cols[3] = ""
    path.write_text("".join("\t".join(cols) + "\n" for cols in lines))
    news = NewsTable()
    read_mind_news(tmp_path / "train" / "news.tsv", news, FaultLog(), 1 << 20)
    ref = columnar.ours_parse(path, news)
    assert (ref["history"].lengths() == 0).any() and len(set(ref["time"].tolist())) > 1  # the cases are there
    got = columnar.arrow_parse(path, news.ids) if reader == "pyarrow" else columnar.polars_parse(path, news.ids)
    assert columnar.same(got, ref) == []
    # and a wrong parse is told apart: one history id changed
    got["history"].values[0] = (got["history"].values[0] + 1) % len(news)
    assert columnar.same(got, ref) == ["history"]


def test_the_columnar_section_says_which_reader_is_faster_from_its_rows():
    from benchmarks.scale import columnar_section

    def row(ours, arrow, polars):
        return {"lines": 1000, "us_per_line": {"speedyrec": ours, "pyarrow": arrow, "polars": polars},
                "differs": {}, "missing": []}

    assert columnar_section({}) == []
    slower = "\n".join(columnar_section({"columnar": [row(6.0, 7.0, 20.0), row(6.0, 6.6, 18.0)],
                                         "columnar_commit": "abc"}))
    assert "The fastest columnar reader, pyarrow, takes 1.13x our time" in slower and "numpy alone is kept" in slower
    faster = "\n".join(columnar_section({"columnar": [row(6.0, 3.0, 20.0), row(6.0, 2.4, 18.0)]}))
    assert "pyarrow parses these plain lines in 0.45x our time" in faster
    bad = {**row(6.0, 7.0, 20.0), "differs": {"polars": ["time"]}, "missing": ["polars"]}
    text = "\n".join(columnar_section({"columnar": [bad]}))
    assert "polars: time" in text and "Not installed, not measured: polars" in text
    # a reader refused at one size (its arrays differed) is not tabled at the others
    refused = {**row(6.0, 7.0, 20.0), "differs": {"polars": ["user"]}}
    del refused["us_per_line"]["polars"]
    text = "\n".join(columnar_section({"columnar": [row(6.0, 7.0, 20.0), refused]}))
    assert "polars µs/line" not in text and "polars: user" in text and "pyarrow, takes 1.17x" in text
