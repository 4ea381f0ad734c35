"""Every click stage (finetune_teachers, distill_finetune, newsbert and the pipeline's plain student, stage=finetune)
takes the engine's other techniques: BusLM segments, refined text, periodic dev evaluation with patience; and the
pipeline runs so on the real MIND sample. Tiny random encoders, a few steps per stage."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_distill_e2e import METRICS, args, check_click_metrics, check_engine_stats, read

from speedyrec.distill.snapshots import read_snapshot
from speedyrec.engine.checkpoint import read_part, step_dirs
from speedyrec.train import main

CLICK_STAGES = ("finetune_teachers", "distill_finetune", "newsbert", "student_plain")
MODELS = {"teacher_1", "teacher_2", "plain", "ensemble", "student", "student_plain", "newsbert_student"}
# several optimizer steps per click stage (one batch holds the whole epoch at the default budget)
SEVERAL_STEPS = ("engine.token_budget=1500", "train.max_steps=4")
LOSSES = {"finetune_teachers": ("loss_teacher_1", "loss_teacher_2", "loss_plain"),
          "distill_finetune": ("loss_distill", "loss_emb", "loss_ce"),
          "newsbert": ("loss_teacher_ce", "loss_ce", "loss_distill", "loss_hidden", "loss_user_mse")}


def run_pipeline(out, cache_dir, data, *extra) -> None:
    assert main(args(out, cache_dir, data, "stage=pipeline", "pipeline.baselines=true", *SEVERAL_STEPS, *extra)) == 0


def model_files(out) -> dict:
    """Every model file the click stages wrote, by name."""
    files = {f"teacher {p.stem}": p for p in (out / "finetune_teachers" / "teachers").glob("*.safetensors")}
    files.update({"student": out / "distill_finetune" / "student.safetensors",
                  "newsbert student": out / "newsbert" / "student.safetensors",
                  "newsbert teacher": out / "newsbert" / "teacher.safetensors"})
    return files


def curve_steps(out, stage) -> list[int]:
    return [p["step"] for p in read(out / stage / "dev_curve.json")["points"]]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, cache_dir, synthetic_small):
    out = tmp_path_factory.mktemp("plain")
    run_pipeline(out, cache_dir, synthetic_small)
    return out


@pytest.fixture(scope="module")
def buslm_run(tmp_path_factory, cache_dir, synthetic_small):
    """Title, abstract and body as BusLM segments in every click stage, evaluated every 2 steps."""
    out = tmp_path_factory.mktemp("buslm")
    run_pipeline(out, cache_dir, synthetic_small, "engine.buslm=true", "engine.segments=[title,abstract,body]",
                 "data.abstract_tokens=16", "data.body_tokens=32", "eval.every=2", f"distill.bank_dir={out / 'banks'}")
    return out


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory, cache_dir, synthetic_small):
    out = tmp_path_factory.mktemp("refine")
    run_pipeline(out, cache_dir, synthetic_small, "engine.refine=true", "engine.refine_topk=8",
                 f"distill.bank_dir={out / 'banks'}")
    return out


def test_buslm_with_one_segment_trains_every_click_stage_as_one_sequence(tmp_path, cache_dir, synthetic_small,
                                                                         plain_run):
    """A news of one field is one segment: BusLM's bus has nothing to carry and its segment pooling weighs the one
    segment 1 (its gradient is zero), so every click stage trains and evaluates as on the plain sequence: the
    teachers, their bank, Stage II's student, NewsBERT and the plain student alike."""
    out = tmp_path / "one_segment"
    run_pipeline(out, cache_dir, synthetic_small, "engine.buslm=true", "engine.segments=[title]")
    for stage, losses in LOSSES.items():
        a, b = read(plain_run / stage / "stats.json"), read(out / stage / "stats.json")
        assert a["steps"] == b["steps"] == 4 and a["clicks_trained"] == b["clicks_trained"], stage
        for k in losses:
            assert b[k] == pytest.approx(a[k], rel=1e-5), (stage, k)
    plain, buslm = read(plain_run / "metrics.json")["models"], read(out / "metrics.json")["models"]
    assert set(plain) == set(buslm) == MODELS
    for name in MODELS:
        for k in METRICS:
            assert buslm[name][k] == pytest.approx(plain[name][k], abs=1e-5), (name, k)
    for name, path in model_files(out).items():  # BusLM did run: every model holds a segment pooling
        assert any(".segment_pool." in k for k in read_snapshot(path)["delta"]), name
        assert not any(".segment_pool." in k for k in read_snapshot(model_files(plain_run)[name])["delta"]), name


def test_buslm_in_every_click_stage_with_periodic_evaluation(buslm_run):
    out = buslm_run
    summary = read(out / "metrics.json")
    assert set(summary["models"]) == MODELS
    for m in summary["models"].values():
        check_click_metrics(m)
    for stage in CLICK_STAGES:
        check_engine_stats(read(out / stage / "stats.json"))
        points = read(out / stage / "dev_curve.json")["points"]
        assert [p["step"] for p in points] == [2, 4], stage
        metrics = read(out / stage / "metrics.json")
        # the final evaluation is the last periodic one (at the last step), and it is what metrics.json holds
        if stage in ("distill_finetune",):
            assert {k: metrics["student"][k] for k in METRICS} == {k: points[-1][k] for k in METRICS}
        elif stage == "student_plain":
            assert {k: metrics[k] for k in METRICS} == {k: points[-1][k] for k in METRICS}
        else:
            for name, m in points[-1].items():
                if isinstance(m, dict):
                    assert {k: metrics[name][k] for k in METRICS} == {k: m[k] for k in METRICS}, (stage, name)
        records = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in records if r["kind"].startswith("dev")}) == [2, 4], stage
    for name, path in model_files(out).items():
        snap = read_snapshot(path)
        assert any(".segment_pool." in k for k in snap["delta"]), name
        assert snap["meta"]["news_encoding"] == {"segments": ["title", "abstract", "body"], "refine_topk": 0}, name
    # the teachers' stage built the bank of its 3 teachers in their layout; Stage II found it there (the other banks
    # are Stage I's, of titles and bodies read as one sequence)
    assert read(out / "distill_finetune/stats.json")["bank_news_encoded"] == 0
    assert sum("-segments-" in p.name for p in (out / "banks").iterdir()) == 3
    # a BusLM student is not exported as a plain transformer, and says why
    assert "engine.buslm" in read(out / "distill_finetune/metrics.json")["student"]["news_encoder"]["skipped"]


@pytest.mark.parametrize("other, needle", [
    ((), "trained on news read with engine.buslm=true, engine.segments=['title', 'abstract', 'body']"),
    (("engine.buslm=true", "engine.segments=[title,abstract]"), "engine.segments=['title', 'abstract']")])
def test_a_student_refuses_teachers_that_read_news_another_way(tmp_path, cache_dir, synthetic_small, buslm_run,
                                                               capsys, other, needle):
    """Stage II with teachers trained on BusLM segments but run without them (or with other segments): its bank
    would be built from an input the student never sees. Refused, naming the keys, before any training."""
    rc = main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=distill_finetune", f"distill.from_dir={buslm_run}",
                   "data.abstract_tokens=16", "data.body_tokens=32", f"distill.bank_dir={buslm_run / 'banks'}", *other))
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "the same input" in err
    assert not (tmp_path / "o" / "distill_finetune" / "stats.json").exists()


def test_refined_text_in_every_click_stage(tmp_path, cache_dir, synthetic_small, refine_run):
    """The teachers, Stage II's student and both NewsBERT models learn a frequency embedding of the refined words;
    Stage II, reading the teachers back from their files, computes the bank the teachers' stage stored: the
    embedding joins each teacher above the layers it kept frozen, as in its finetuning."""
    out = refine_run
    for m in read(out / "metrics.json")["models"].values():
        check_click_metrics(m)
    for stage in CLICK_STAGES:
        check_engine_stats(read(out / stage / "stats.json"))
    for name, path in model_files(out).items():
        snap = read_snapshot(path)
        assert snap["meta"]["news_encoding"] == {"segments": None, "refine_topk": 8}, name
        assert snap["delta"]["frequency.weight"].abs().sum() > 0, name  # starts at zero: it trained
    banks = tmp_path / "banks"
    assert main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=distill_finetune", "engine.refine=true",
                     "engine.refine_topk=8", f"distill.from_dir={out}", f"distill.bank_dir={banks}",
                     *SEVERAL_STEPS)) == 0
    assert read(tmp_path / "o/distill_finetune/stats.json")["bank_news_encoded"] == 2 * 750
    built = sorted(banks.iterdir())
    assert len(built) == 2
    for d in built:
        np.testing.assert_allclose(np.load(d / "vectors.npy"), np.load(out / "banks" / d.name / "vectors.npy"),
                                   rtol=1e-4, atol=1e-5)
    # the same student as the pipeline's Stage II
    got, want = read(tmp_path / "o/distill_finetune/metrics.json"), read(out / "distill_finetune/metrics.json")
    assert {k: got["student"][k] for k in METRICS} == pytest.approx({k: want["student"][k] for k in METRICS}, abs=1e-6)


def test_patience_stops_every_click_stage_and_its_checkpoints_keep_the_curve(tmp_path, cache_dir, synthetic_small):
    """BusLM and refined text together, nothing learning (zero learning rates): the AUC never beats the first
    evaluation, so eval.patience=1 stops each click stage after its second; the curve is in dev_curve.json and in
    the stage's last checkpoint (a resumed run continues it)."""
    out = tmp_path / "patience"
    assert main(args(out, cache_dir, synthetic_small, "stage=pipeline", "pipeline.baselines=true", "engine.buslm=true",
                     "engine.segments=[title,abstract]", "data.abstract_tokens=16", "engine.refine=true",
                     "engine.token_budget=1500", "train.max_steps=8", "train.lr=0", "train.encoder_lr=0",
                     "eval.every=1", "eval.patience=1", "train.checkpoint_every=1")) == 0
    log = (out / "train.log").read_text()
    for stage in CLICK_STAGES:
        stats = read(out / stage / "stats.json")
        check_engine_stats(stats)
        assert stats["steps"] == 2 and stats["clicks_not_reached"] > 0, stage
        points = read(out / stage / "dev_curve.json")["points"]
        assert [p["step"] for p in points] == [1, 2], stage
        newest = step_dirs(out / stage / "checkpoints")[0]
        assert newest.name == "step_2"
        kept = read_part(newest, "model")["curve"]
        assert [{k: v for k, v in p.items() if k != "train_seconds"} for p in kept] == \
            [{k: v for k, v in p.items() if k != "train_seconds"} for p in points], stage
    for label in ("the teachers' mean dev AUC", "dev AUC", "the student's dev AUC"):
        assert f"{label} has not improved for 1 evaluations" in log, label
    assert log.count("has not improved for 1 evaluations") == 4


def test_pipeline_on_the_real_mind_sample_with_buslm_and_periodic_evaluation(tmp_path, cache_dir, mind_sample):
    """`stage=pipeline engine.buslm=true eval.every=2 train.max_steps=3` as written, on the real MIND-format slice (a
    tiny model; baselines on): MIND ships no bodies, so post-training matches titles with abstracts
    (posttrain.body_field=auto), and the default segments keep the fields with a token budget (the title alone at
    data.abstract_tokens=0). Every model is evaluated, every click stage twice."""
    out = tmp_path / "run"
    argv = [a for a in args(out, cache_dir, mind_sample, "stage=pipeline", "pipeline.baselines=true",
                            "engine.buslm=true", "eval.every=2", "train.max_steps=3", "eval.max_impressions=0")
            if not a.startswith("data.format=")] + ["data.format=mind"]
    assert main(argv) == 0
    summary = read(out / "metrics.json")
    assert set(summary["models"]) == MODELS
    for m in summary["models"].values():
        check_click_metrics(m)
    for stage in CLICK_STAGES:
        stats = read(out / stage / "stats.json")
        check_engine_stats(stats)
        assert stats["steps"] == 3 and stats["clicks_unknown_news"] > 0, stage  # the slice is not closed
        assert curve_steps(out, stage) == [2, 3], stage
    for name, path in model_files(out).items():
        assert read_snapshot(path)["meta"]["news_encoding"]["segments"] == ["title"], name
    post = read(out / "posttrain/metrics.json")
    assert len(post["snapshots"]) == 2
    assert read(out / "posttrain/stats.json")["body_field"] == "abstract"
    assert "| student | Tiny-NewsRec student | 2 |" in (out / "pipeline.md").read_text()


def test_the_click_stages_accept_the_techniques_and_the_title_body_stages_refuse_them():
    from speedyrec.config import ConfigError, load_config

    techniques = (["engine.buslm=true", "engine.segments=[title]"], ["engine.refine=true"],
                  ["eval.every=3", "eval.patience=2"], ["eval.every_seconds=30"])
    for stage in ("finetune", "finetune_teachers", "distill_finetune", "newsbert", "pipeline"):
        for extra in techniques:
            load_config(None, [f"stage={stage}", *extra])
    for stage in ("posttrain", "distill_posttrain"):
        for extra in techniques:
            with pytest.raises(ConfigError, match=f"stage={stage}.*In stage=pipeline it applies to the click stages"):
                load_config(None, [f"stage={stage}", *extra])



@pytest.mark.parametrize("run, settings", [
    ("buslm_run", ("engine.buslm=true", "engine.segments=[title,abstract,body]", "data.abstract_tokens=16",
                   "data.body_tokens=32")),
    ("refine_run", ("engine.refine=true", "engine.refine_topk=8"))])
def test_stage2_reads_the_same_teachers_from_the_bank_and_online(request, tmp_path, cache_dir, synthetic_small, run,
                                                                 settings):
    """distill.bank=false runs each teacher (BusLM, or with its frequency embedding) in every student step: the same
    losses and student as the bank's."""
    out_dir = request.getfixturevalue(run)
    runs = {}
    for bank in ("true", "false"):
        out = tmp_path / bank
        assert main(args(out, cache_dir, synthetic_small, "stage=distill_finetune", f"distill.from_dir={out_dir}",
                         f"distill.bank_dir={out_dir / 'banks'}", f"distill.bank={bank}", "engine.cache=false",
                         *SEVERAL_STEPS, *settings)) == 0
        runs[bank] = read(out / "distill_finetune/stats.json"), read(out / "distill_finetune/metrics.json")["student"]
    (fast, fm), (naive, nm) = runs["true"], runs["false"]
    assert fast["bank_news_encoded"] == 0 and fast["steps"] == naive["steps"] == 4
    for k in LOSSES["distill_finetune"]:
        assert fast[k] == pytest.approx(naive[k], rel=1e-4), k
    for k in METRICS:
        assert fm[k] == pytest.approx(nm[k], abs=2e-3), k
