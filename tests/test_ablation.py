"""The ablations of Tiny-NewsRec's Figures 3 and 4 on a tiny random encoder: each loss term off in both stages
(distill.distill_weight, distill.emb_weight, distill.ce_weight_dp/ft), each stage off (distill.student_init=plm,
pipeline.stage2=false), the configs that leave a stage nothing to learn from, and benchmarks.ablation's harness."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from test_distill_e2e import args, check_click_metrics, read

import speedyrec.recipes.distill_finetune as stage2_recipe
import speedyrec.recipes.distill_posttrain as stage1_recipe
from speedyrec.config import ConfigError, load_config
from speedyrec.distill.bank import TeacherBank
from speedyrec.distill.snapshots import read_snapshot
from speedyrec.recipes.finetune import FinetuneRecipe
from speedyrec.train import main

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")

LOSSES = ("loss_distill", "loss_emb", "loss_ce")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache of this module's own: its teacher banks would otherwise be found by test_distill_e2e's pipeline of
    the same teachers, which counts the news its teacher stage encodes into the bank."""
    return tmp_path_factory.mktemp("ablation_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir, synthetic_small):
    """The full pipeline whose teachers every ablation links (as benchmarks.ablation links a seed's base run)."""
    out = tmp_path_factory.mktemp("base")
    assert main(args(out, cache_dir, synthetic_small, "stage=pipeline", "pipeline.newsbert=false")) == 0
    return out


def ablate(tmp_path, cache_dir, data, base, *switch) -> tuple:
    out = tmp_path / "ablated"
    assert main(args(out, cache_dir, data, "stage=pipeline", f"pipeline.teachers_from={base}", *switch)) == 0
    return out, read(out / "metrics.json")


def refuse(monkeypatch, module, name: str) -> None:
    """Make ``module.name`` raise: a term whose weight is 0 must not be computed at all."""
    def called(*a, **k):
        raise AssertionError(f"{name} was computed")
    monkeypatch.setattr(module, name, called)


@pytest.mark.parametrize("switch, off, computed", [
    (("distill.distill_weight=0",), "loss_distill", ("distillation_loss",)),
    (("distill.emb_weight=0",), "loss_emb", ("embedding_loss", "projected_mse")),
    (("distill.ce_weight_dp=0", "distill.ce_weight_ft=0"), "loss_ce", ("candidate_cross_entropy",
                                                                       "click_cross_entropy"))])
def test_a_weight_of_zero_removes_its_term_from_both_stages(tmp_path, cache_dir, synthetic_small, base, monkeypatch,
                                                            switch, off, computed):
    for name in computed:
        for module in (stage1_recipe, stage2_recipe):
            if hasattr(module, name):
                refuse(monkeypatch, module, name)
    out, summary = ablate(tmp_path, cache_dir, synthetic_small, base, *switch)
    for stage in ("distill_posttrain", "distill_finetune"):
        stats, full = read(out / stage / "stats.json"), read(base / stage / "stats.json")
        assert off not in stats, stage  # not computed, not counted
        assert all(stats[k] > 0 for k in LOSSES if k != off), stage
        assert stats["teachers"] == 2  # the other teacher term still reads them
        # without the term the student trains otherwise: other losses, other weights
        assert any(stats[k] != pytest.approx(full[k], rel=1e-6) for k in LOSSES if k != off), stage
        mine = read_snapshot(out / stage / "student.safetensors")["checksum"]
        assert mine != read_snapshot(base / stage / "student.safetensors")["checksum"], stage
    check_click_metrics(summary["models"]["student"])
    assert summary["models"]["teacher_1"] == read(base / "metrics.json")["models"]["teacher_1"]  # the same teachers


def test_without_the_teacher_terms_a_stage_reads_no_teacher(tmp_path, cache_dir, synthetic_small, base, monkeypatch):
    def no_bank(*a, **k):
        raise AssertionError("a teacher bank was opened")
    monkeypatch.setattr(TeacherBank, "open_or_build", no_bank)
    refuse(monkeypatch, stage2_recipe, "load_finetuned_recommender")
    refuse(monkeypatch, stage1_recipe, "load_posttrained_encoder")
    out, summary = ablate(tmp_path, cache_dir, synthetic_small, base, "distill.distill_weight=0",
                          "distill.emb_weight=0")
    for stage in ("distill_posttrain", "distill_finetune"):
        stats = read(out / stage / "stats.json")
        assert stats["teachers"] == 0 and stats["loss_ce"] > 0 and not {"loss_distill", "loss_emb"} & set(stats)
    check_click_metrics(summary["models"]["student"])


def test_without_stage1_the_pipeline_trains_no_stage1(tmp_path, cache_dir, synthetic_small, base):
    out, summary = ablate(tmp_path, cache_dir, synthetic_small, base, "distill.student_init=plm")
    assert set(summary["seconds"]) == {"distill_finetune"} and summary["stage1"] is None
    assert not (out / "distill_posttrain").exists()
    assert "without Stage I" in summary["models"]["student"]["kind"]
    assert read_snapshot(out / "distill_finetune/student.safetensors")["meta"]["student_init"] == "plm"
    check_click_metrics(summary["models"]["student"])


def test_without_stage2_the_stage1_student_is_finetuned_without_teachers(tmp_path, cache_dir, synthetic_small, base,
                                                                        monkeypatch):
    """pipeline.stage2=false: Stage I as in the full run, then its student (its weights, checked) finetuned on
    clicks as the plain student is: no teacher is loaded and Stage II does not run."""
    started, setup = {}, FinetuneRecipe.setup

    def setup_and_look(self):
        setup(self)
        started.update({k: v.detach().clone() for k, v in self.model.news_encoder.state_dict().items()})
        started["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
    monkeypatch.setattr(FinetuneRecipe, "setup", setup_and_look)
    refuse(monkeypatch, stage2_recipe.DistillFinetuneRecipe, "run")
    refuse(monkeypatch, stage2_recipe, "load_finetuned_recommender")
    out, summary = ablate(tmp_path, cache_dir, synthetic_small, base, "pipeline.stage2=false")
    assert set(summary["seconds"]) == {"distill_posttrain", "student_stage1"}
    assert "student" not in summary["models"] and "no Stage II" in summary["models"]["student_stage1"]["kind"]
    check_click_metrics(summary["models"]["student_stage1"])
    stage1 = read_snapshot(out / "distill_posttrain/student.safetensors")
    # Stage I ran as in the full pipeline (same settings and teachers): the same student
    assert stage1["checksum"] == read_snapshot(base / "distill_posttrain/student.safetensors")["checksum"]
    for name, t in stage1["delta"].items():  # the finetuned student started from every tensor Stage I trained
        assert torch.equal(started[name], t), name
    assert started["trainable"] > 0
    stats = read(out / "student_stage1/stats.json")
    assert stats["clicks_trained"] > 0 and not any(k.startswith("loss_distill") for k in stats)
    assert not (out / "distill_finetune").exists()


def config(*over: str):
    return load_config(None, ["model.encoder=random:hidden=32,layers=4,heads=2,intermediate=64", *over])


@pytest.mark.parametrize("over, needle", [
    (("stage=pipeline", "distill.distill_weight=0", "distill.emb_weight=0", "distill.ce_weight_dp=0"),
     "Stage I would train on no loss"),
    (("stage=distill_finetune", "distill.distill_weight=0", "distill.emb_weight=0", "distill.ce_weight_ft=0"),
     "Stage II would train on no loss"),
    (("stage=pipeline", "pipeline.stage2=false", "distill.student_init=plm"), "the student is the plain student"),
    (("stage=pipeline", "distill.distill_weight=-1"), "'distill.distill_weight' must be >= 0")])
def test_configs_that_leave_a_stage_nothing_to_learn_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        config(*over)


def test_a_stage_that_does_not_run_may_have_its_terms_off():
    # Stage I skipped (student_init=plm): its own loss may be off; Stage II ablated: its own may be off
    config("stage=pipeline", "distill.student_init=plm", "distill.distill_weight=0", "distill.emb_weight=0",
           "distill.ce_weight_dp=0")
    config("stage=pipeline", "pipeline.stage2=false", "distill.distill_weight=0", "distill.emb_weight=0",
           "distill.ce_weight_ft=0")
    assert config().distill.distill_weight == 1.0 and config().pipeline.stage2 is True  # today's behaviour


def test_benchmark_ablation_tables_and_verdict_from_fabricated_numbers(tmp_path, monkeypatch):
    """The report of benchmarks.ablation (its --quick run takes minutes: run by hand): per-seed rows, means, the
    differences to full paired by seed, and a verdict written from them. Here every ablation loses to full as in
    the paper, except no_target, which gains, and the order of Figure 4 is broken by no_emb."""
    import benchmarks.ablation as ablation
    import benchmarks.common as common

    for module in (common,):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    drop = {"full": 0, "no_stage1": 0.004, "no_stage2": 0.010, "no_both": 0.015, "no_distill": 0.008,
            "no_emb": 0.009, "no_target": -0.003, "body_512": -0.002}
    per_seed = {str(s): {r: {k: 0.70 + 0.001 * s - d for k in METRICS} for r, d in drop.items()} for s in range(3)}
    runs = {"seed_0": {"summary": {"seconds": {"distill_finetune": 60.0}}}}
    for s in range(3):  # body_512's teachers gain 1 point (1.5 and 0.5 for its two teachers) and cost 5x
        runs[f"base_seed_{s}"] = {"summary": _pipeline_summary(0.68, 100.0, 0.5)}
        runs[f"ablation_body_512_seed_{s}"] = {"summary": _pipeline_summary(0.69, 500.0, 0.75)}
    info = {"device": "CPU", "torch": "x", "threads": 2, "commit": "abc1234"}
    payload = ablation.report(per_seed, runs, info, True, "python -m benchmarks.ablation --quick", 3.0)
    saved = json.loads((tmp_path / "ablation_quick.json").read_text())
    assert list(saved["rows"]) == list(ablation.ROWS) and saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert saved["rows"]["no_stage2"]["seeds"]["1"]["auc"] == pytest.approx(0.691)
    assert saved["rows"]["no_both"]["minus_full"]["auc"]["mean"] == pytest.approx(-0.015)
    assert saved["rows"]["no_both"]["minus_full"]["auc"]["std"] == pytest.approx(0, abs=1e-12)
    md = (tmp_path / "ablation_quick.md").read_text()
    assert "## Verdict" in md and "abc1234" in md and "python -m benchmarks.ablation --quick" in md
    assert "`no_stage2`: AUC -1.00 ± 0.00 points against `full` over 3 seed(s), below the full student, as in the paper" in md
    assert "`no_target`: AUC +0.30 ± 0.00 points against `full` over 3 seed(s), above the full student: disagrees" in md
    assert "Stage II matters more than Stage I: against `full`, `no_stage2` -1.00 AUC points, `no_stage1` -0.40 " \
           "(paired, `no_stage2` - `no_stage1`: -0.60 ± 0.00): agrees" in md
    assert "the distillation loss matters more than the embedding loss: against `full`, `no_distill` -0.80 AUC " \
           "points, `no_emb` -0.90 (paired, `no_distill` - `no_emb`: +0.10 ± 0.00): disagrees" in md
    assert "`body_512`: AUC +0.20 ± 0.00 points against `full` over 3 seed(s), above the full student: the longer " \
           "bodies help" in md
    # its own teachers beside the base run's, and the cost of post-training + Stage I in both
    assert "`body_512`'s own teachers: mean AUC +1.00 ± 0.00 points against the base run's over 3 seed(s); " \
           "post-training + Stage I took 5.0x the time" in md
    assert "## `body_512`: its teachers and its cost" in md
    assert "| 0 | `full` | 64 | 68.00 | 68.50 | 50.00 | 40.00 | 40 | 60 | 100 |" in md
    assert "| 0 | `body_512` | 8 x 64 (BusLM) | 69.00 | 69.50 | 75.00 | 40.00 | 200 | 300 | 500 |" in md
    assert saved["body_512_teachers"]["2"]["body_512"]["teacher_auc"] == pytest.approx(0.69)
    assert "its own pipeline, no baselines: `posttrain.body_segments=8`" in md
    assert "provisional" not in md
    if importlib.util.find_spec("matplotlib") is not None:  # the [bench] extra: CI installs [test] only
        assert (tmp_path / "ablation_quick.png").is_file()


def _pipeline_summary(teacher_auc: float, seconds: float, retrieval: float) -> dict:
    """A pipeline's metrics.json as the ablation reads it: two teachers around ``teacher_auc``, the ensemble half a
    point above, every student at 0.6; post-training 40% and Stage I 60% of ``seconds``."""
    models = {"teacher_1": teacher_auc + 0.005, "teacher_2": teacher_auc - 0.005, "ensemble": teacher_auc + 0.005,
              "plain": 0.6, "student": 0.6, "student_plain": 0.6, "student_stage1": 0.6}
    return {"models": {name: {k: auc for k in METRICS} for name, auc in models.items()},
            "seconds": {"posttrain": 0.4 * seconds, "distill_posttrain": 0.6 * seconds, "distill_finetune": 60.0},
            "posttrain": [{"step": 3, "retrieval_acc": retrieval - 0.1}, {"step": 5, "retrieval_acc": retrieval + 0.1}],
            "stage1": {"student": {"final": {"retrieval_acc": 0.4}}}}


def test_benchmark_ablation_runs_body_512_as_its_own_pipeline(tmp_path, monkeypatch):
    """body_512 changes post-training, so it cannot link the seed's base run's teachers: its pipeline runs alone
    (its switch, no pipeline.teachers_from, no baselines), while every other row links the base run's."""
    import benchmarks.ablation as ablation
    import benchmarks.quality as quality

    calls = {}

    def run_job(name, overrides, root, timeout):
        calls[name] = overrides
        if name == "base_seed_0":  # its teachers are what the linking rows need
            (root / name / "finetune_teachers").mkdir(parents=True)
            (root / name / "finetune_teachers" / "done.json").write_text("{}")
        else:
            (root / name).mkdir(parents=True)
        teachers = 0.69 if name == "ablation_body_512_seed_0" else 0.68
        return {"command": "python -m speedyrec.train " + " ".join(overrides), "process_seconds": 1.0,
                "metrics": _pipeline_summary(teachers, 100.0, 0.5)}
    monkeypatch.setattr(quality, "run_job", run_job)
    monkeypatch.setattr(quality, "source_commit", lambda: "abc1234")
    metrics, runs = ablation.seed_rows(tmp_path, 0, True, {}, may_run=True)
    assert set(metrics) == set(ablation.ROWS) and set(calls) == {*(f"ablation_{r}_seed_0" for r in ablation.ROWS
                                                                   if r not in ("full", "no_both")), "base_seed_0"}
    own = calls["ablation_body_512_seed_0"]
    assert "posttrain.body_segments=8" in own and "stage=pipeline" in own and "train.seed=0" in own
    assert not any(o.startswith(("pipeline.teachers_from=", "pipeline.baselines=")) for o in own)
    assert all("posttrain.body_segments=8" not in o for name, o in calls.items() if "body_512" not in name)
    for name, overrides in calls.items():
        if name not in ("base_seed_0", "ablation_body_512_seed_0"):
            assert f"pipeline.teachers_from={tmp_path / 'base_seed_0'}" in overrides, name
    assert metrics["body_512"]["auc"] == 0.6  # the row's model: the Tiny-NewsRec student of its own pipeline
    sides = ablation.teacher_sides(runs, ["0"])["0"]
    assert sides["body_512"]["teacher_auc"] == pytest.approx(0.69) and sides["full"]["teacher_auc"] == pytest.approx(0.68)
    # kept in --out: a second invocation runs nothing
    calls.clear()
    assert ablation.seed_rows(tmp_path, 0, True, {}, may_run=True)[0] == metrics and not calls


def test_benchmark_ablation_writes_each_row_as_it_finishes_and_keeps_earlier_sessions_seeds(tmp_path, monkeypatch):
    """A seed takes hours: every finished row is in the results file before the next one runs, so a session that
    ends mid-seed keeps it; a later session's --seeds 1 tabulates the recorded seed 0 beside seed 1, running
    nothing of seed 0 (its run folders are gone)."""
    import benchmarks.ablation as ablation
    import benchmarks.common as common
    import benchmarks.quality as quality

    for module in (common,):
        monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    calls, written = [], []

    def run_job(name, overrides, root, timeout):
        calls.append(name)
        (root / name / "finetune_teachers").mkdir(parents=True)
        (root / name / "finetune_teachers" / "done.json").write_text("{}")
        return {"command": "python -m speedyrec.train " + " ".join(overrides), "process_seconds": 1.0,
                "metrics": _pipeline_summary(0.68, 100.0, 0.5)}

    real_report = ablation.report

    def report(per_seed, runs, *a):
        written.append({s: set(m) for s, m in per_seed.items()})
        return real_report(per_seed, runs, *a)

    monkeypatch.setattr(quality, "run_job", run_job)
    monkeypatch.setattr(ablation, "report", report)
    ablation.main(["--quick", "--seeds", "0", "--out", str(tmp_path / "first")])
    switched = [r for r, (_, switch, _) in ablation.ROWS.items() if switch is not None]
    # one report per switched row as it finishes, growing by one row each time, then the seed's
    assert [len(w["0"]) for w in written[:len(switched)]] == [3 + k for k in range(len(switched))]
    assert written[0]["0"] == {switched[0], "full", "no_both"}  # the base run ran first, for the linked row
    calls.clear()
    payload = ablation.main(["--quick", "--seeds", "1", "--out", str(tmp_path / "second")])
    assert all(name.endswith("_seed_1") for name in calls) and calls
    assert sorted(payload["rows"]["full"]["seeds"]) == ["0", "1"]
    saved = json.loads((tmp_path / "results" / "ablation_quick.json").read_text())
    assert {"base_seed_0", "base_seed_1", "ablation_no_emb_seed_0"} <= set(saved["runs"])


def test_an_order_of_two_ablations_is_told_apart_only_past_its_paired_spread():
    """Figure 4's orderings are judged on the two rows' paired difference: -0.93 against -0.90 with seeds that
    disagree is no ordering, whichever mean is larger."""
    from benchmarks import ablation

    def row(aucs, full):
        diffs = [a - f for a, f in zip(aucs, full)]
        return {"seeds": {str(k): {"auc": a} for k, a in enumerate(aucs)},
                "minus_full": {"auc": ablation._mean_std(diffs), "seeds": [str(k) for k in range(len(aucs))]}}

    full = [0.7466, 0.7408]
    rows = {"no_distill": row([0.7383, 0.7306], full), "no_target": row([0.7359, 0.7336], full)}
    text = "\n".join(ablation.verdict(rows))
    assert "the distillation loss matters more than the target loss: against `full`, `no_distill` -0.93 AUC points, " \
           "`no_target` -0.90 (paired, `no_distill` - `no_target`: -0.03 ± 0.38): not told apart" in text
    rows["no_target"] = row([0.7409, 0.7356], full)  # now each seed loses less without the target loss
    text = "\n".join(ablation.verdict(rows))
    assert "(paired, `no_distill` - `no_target`: -0.38 ± 0.17): agrees (clear: beyond twice its spread)." in text
    rows["no_target"] = row([0.7423, 0.7316], full)  # past its spread once, not twice: an ordering, not a clear one
    text = "\n".join(ablation.verdict(rows))
    assert "(paired, `no_distill` - `no_target`: -0.25 ± 0.21): agrees." in text
    # the rows' own drops carry the same mark: no_distill's 0.93 ± 0.13 is clear, no_target's 0.68 ± 0.35 is not
    assert "`no_distill`: AUC -0.93 ± 0.13 points against `full` over 2 seed(s), below the full student, as in the " \
           "paper (clear: beyond twice its spread)." in text
    assert "`no_target`: AUC -0.68 ± 0.35 points against `full` over 2 seed(s), below the full student, as in the " \
           "paper." in text
