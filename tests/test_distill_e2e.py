"""Tiny-NewsRec and NewsBERT stages end to end on a tiny random encoder: the pipeline's files and table, each
stage alone, the earlier paper's options, the checksum guard, NewsBERT's shared layers, 2 gloo ranks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import save_file

from speedyrec.distill.snapshots import read_snapshot
from speedyrec.train import main

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
ENCODER4 = "model.encoder=random:hidden=32,layers=4,heads=2,intermediate=64"
# small everything: 2 teachers, a few steps per stage
SMALL = ("posttrain.teachers=2", "posttrain.snapshot_after=3", "posttrain.snapshot_every=2", "posttrain.holdout=40",
         "posttrain.title_tokens=12", "posttrain.body_tokens=20", "posttrain.batch_size=16", "data.title_tokens=14",
         "distill.stage1_epochs=1", "train.max_steps=3", "eval.max_impressions=30", "model.dropout=0")


def args(out: Path, cache: Path, data: Path, *extra: str) -> list[str]:
    return tiny_overrides(out, cache, "data.format=synthetic", f"data.dir={data}", ENCODER4, *SMALL, *extra)


def read(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def check_click_metrics(m: dict) -> None:
    for k in METRICS:
        assert isinstance(m[k], float) and math.isfinite(m[k]) and 0 <= m[k] <= 1, (k, m)


def check_engine_stats(s: dict) -> None:
    assert s["clicks_trained"] + s["clicks_unknown_news"] + s["clicks_not_reached"] == s["epochs"] * s["clicks_in_data"]
    assert s["clicks_trained"] > 0 and s["sequences_dropped"] == 0


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, cache_dir, synthetic_small):
    out = tmp_path_factory.mktemp("pipeline")
    rc = main(args(out, cache_dir, synthetic_small, "stage=pipeline", "pipeline.baselines=true"))
    assert rc == 0
    return out


def test_pipeline_writes_every_stage_and_the_table(pipeline_run):
    out = pipeline_run
    for f in ("posttrain/snapshots/teacher_1.safetensors", "posttrain/snapshots/teacher_2.safetensors",
              "distill_posttrain/student.safetensors", "finetune_teachers/teachers/teacher_1.safetensors",
              "finetune_teachers/teachers/teacher_2.safetensors", "finetune_teachers/teachers/plain.safetensors",
              "distill_finetune/student.safetensors", "newsbert/student.safetensors",
              "distill_finetune/news_encoder/config.json", "distill_finetune/news_encoder/speedyrec_head.py",
              "student_plain/metrics.json", "pipeline.md", "config.yaml"):
        assert (out / f).is_file(), f
    summary = read(out / "metrics.json")
    assert set(summary["models"]) == {"teacher_1", "teacher_2", "ensemble", "plain", "student", "student_plain",
                                      "newsbert_student"}
    for m in summary["models"].values():
        check_click_metrics(m)
    assert summary["models"]["student"]["layers"] == 2 and summary["models"]["teacher_1"]["layers"] == 4
    import yaml  # config.yaml is the config that ran: the baselines turned the plain teacher on

    assert yaml.safe_load((out / "config.yaml").read_text())["teachers"]["plain"] is True
    assert set(summary["seconds"]) == {"posttrain", "distill_posttrain", "finetune_teachers", "distill_finetune",
                                       "student_plain", "newsbert"}
    table = (out / "pipeline.md").read_text()
    assert "| student | Tiny-NewsRec student | 2 |" in table and "| total |" in table


def test_pipeline_stage_outputs(pipeline_run):
    out = pipeline_run
    post = read(out / "posttrain/metrics.json")
    assert [s["step"] for s in post["snapshots"]] == [3, 5]
    assert all(0 <= s["retrieval_acc"] <= 1 and "retrieval_acc_10" in s for s in post["snapshots"])
    assert post["snapshots"][0]["checksum"] != post["snapshots"][1]["checksum"]
    stage1 = read(out / "distill_posttrain/metrics.json")
    assert set(stage1["teachers"]) == {"teacher_1", "teacher_2"}
    s1 = read(out / "distill_posttrain/stats.json")
    assert s1["teachers"] == 2 and s1["bank_padded_tokens"] == 0
    # Stage I's 3 steps (train.max_steps) are the first 3 of the epoch's nearly equal batches of 16 post-training news
    import numpy as np

    n_post = read(out / "posttrain/stats.json")["news_in_data"]
    assert n_post == 750 - 40  # every synthetic news has a title and a body; posttrain.holdout=40
    assert s1["news_trained"] == sum(len(b) for b in np.array_split(np.arange(n_post), -(-n_post // 16))[:3])
    teachers = read(out / "finetune_teachers/stats.json")
    check_engine_stats(teachers)
    assert teachers["teachers"] == 3 and teachers["shared_frozen_layers"] == 1  # 4 layers: 3 post-trained, 2 finetuned
    # the teachers' stage leaves their news vectors in the bank; Stage II finds them there
    assert teachers["bank_news_encoded"] == 3 * 750 and teachers["bank_padded_tokens"] == 0  # every news, 3 teachers
    stage2 = read(out / "distill_finetune/stats.json")
    check_engine_stats(stage2)
    assert stage2["teachers"] == 2 and stage2["bank_news_encoded"] == 0
    assert all(stage2[k] > 0 for k in ("loss_distill", "loss_emb"))
    # 3 steps leave the student's click scores near chance: CE over a click and 1 negative about ln 2
    assert stage2["loss_ce"] == pytest.approx(math.log(2), abs=0.1)
    nb = read(out / "newsbert/stats.json")
    check_engine_stats(nb)
    assert nb["teacher_layers"] == 4 and nb["student_layers"] == 2 and nb["loss_hidden"] > 0
    # every stage keeps its scalars: a JSONL log and a TensorBoard event file; the click stages log dev metrics
    for stage in ("posttrain", "distill_posttrain", "finetune_teachers", "distill_finetune", "newsbert"):
        assert len(list((out / stage).glob("events.out.tfevents.*"))) == 1, stage
        kinds = {json.loads(line)["kind"] for line in (out / stage / "log.jsonl").read_text().splitlines()}
        assert "start" in kinds, stage
        if stage in ("finetune_teachers", "distill_finetune", "newsbert"):
            assert any(k.startswith("dev") for k in kinds), (stage, kinds)


def test_posttraining_can_leave_out_the_news_the_training_log_never_shows(tmp_path, cache_dir, synthetic_small,
                                                                          pipeline_run):
    """posttrain.news=train reads no dev or test candidate's text: the news left out are exactly those of the news
    files that no training history or impression shows (counted here from the files themselves)."""
    news = {line.split("\t")[0] for split in ("train", "dev") for line in open(synthetic_small / split / "news.tsv")}
    shown = set()
    for line in open(synthetic_small / "train" / "behaviors.tsv"):
        f = line.rstrip("\n").split("\t")
        shown |= set(f[3].split()) | {c.rsplit("-", 1)[0] for c in f[4].split()}
    everything = read(pipeline_run / "posttrain/stats.json")
    assert everything["news_without_title_or_body"] == 0 and everything["news_outside_train"] == 0
    out = tmp_path / "o"
    assert main(args(out, cache_dir, synthetic_small, "stage=posttrain", "posttrain.news=train")) == 0
    only = read(out / "posttrain/stats.json")
    assert only["news_outside_train"] == len(news - shown) > 0
    assert only["news_in_data"] + only["holdout_news"] == len(news & shown) == \
        everything["news_in_data"] + everything["holdout_news"] - len(news - shown)


def test_each_finetuned_teacher_starts_from_its_own_snapshot(pipeline_run):
    out = pipeline_run
    post = {s["name"]: s["checksum"] for s in read(out / "posttrain/metrics.json")["snapshots"]}
    teachers = read(out / "finetune_teachers/metrics.json")
    assert teachers.pop("ensemble")["members"] == ["teacher_1", "teacher_2"]  # the plain teacher is no member
    for name, m in teachers.items():
        meta = read_snapshot(m["path"])["meta"]
        if name == "plain":
            assert meta["from"] == "plm" and meta["posttrain_checksum"] is None
        else:
            assert meta["posttrain_checksum"] == post[name]


def test_stages_one_at_a_time_with_the_earlier_papers_options(tmp_path, cache_dir, synthetic_small, pipeline_run):
    """Stage I with one teacher, teachers finetuned with seeds, a learned omega and beta_2 = 0.1, in bf16 autocast,
    reading the pipeline's post-training snapshots."""
    out = tmp_path / "early"
    common = args(out, cache_dir, synthetic_small, f"distill.from_dir={pipeline_run}", "train.amp=bf16")
    assert main([*common, "stage=distill_posttrain", "distill.stage1_teachers=1", "distill.stage1_projections=false"]) == 0
    assert read(out / "distill_posttrain/stats.json")["teachers"] == 1
    saved = read_snapshot(out / "distill_posttrain/student.safetensors")
    assert not any("projections" in k for k in saved["delta"])  # the earlier paper's Stage I has no W_i, b_i
    assert main([*common, "stage=finetune_teachers", "teachers.seeds=true"]) == 0
    teachers = read(out / "finetune_teachers/stats.json")
    assert teachers["teachers"] == 2 and teachers["shared_frozen_layers"] == 2  # one snapshot: every frozen layer shared
    # what the seeds change, as the config says: the snapshot holds the transformer, pooling and projection (all
    # post-trained), so the teachers start apart in their user encoders alone
    from speedyrec.build import build_context
    from speedyrec.config import load_config
    from speedyrec.distill.teachers import load_posttrained_recommender
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.recipes.finetune_teachers import teacher_plan

    ctx = build_context(load_config(None, [*common, "stage=finetune_teachers", "teachers.seeds=true"]), DistInfo())
    plan = teacher_plan(ctx)
    assert [p for _, p, _ in plan] == [plan[0][1]] * 2 and [s for *_, s in plan] == [0, 1]
    (a, _), (b, _) = (load_posttrained_recommender(ctx, path, 2, seed, name) for name, path, seed in plan)
    sa, sb = a.state_dict(), b.state_dict()
    differ = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("news_encoder") else "")
              for k in sa if not torch.equal(sa[k], sb[k])}
    assert differ == {"user_encoder"}
    early = [*common[:-1], f"distill.from_dir={out}", "train.amp=bf16"]
    assert main([*early, "stage=distill_finetune", "distill.learn_omega=true", "distill.ce_weight_ft=0.1"]) == 0
    stats = read(out / "distill_finetune/stats.json")
    assert stats["omega"] > 0 and stats["omega"] != 1.0
    check_click_metrics(read(out / "distill_finetune/metrics.json")["student"])


def test_teachers_with_no_transformer_layer_trained(tmp_path, cache_dir, synthetic_small, pipeline_run):
    """teachers.finetune_layers=0 (what benchmarks.multiteacher's bound measures): every layer is read from the
    caches, only pooling, projection and user encoder train; the saved teachers' transformers are their snapshots'."""
    out = tmp_path / "o"
    assert main(args(out, cache_dir, synthetic_small, "stage=finetune_teachers", f"distill.from_dir={pipeline_run}",
                     "teachers.finetune_layers=0")) == 0
    stats = read(out / "finetune_teachers/stats.json")
    check_engine_stats(stats)
    for k in (1, 2):
        snap = read_snapshot(pipeline_run / f"posttrain/snapshots/teacher_{k}.safetensors")["delta"]
        saved = read_snapshot(out / f"finetune_teachers/teachers/teacher_{k}.safetensors")["delta"]
        layers = [n for n in saved if ".backbone." in n]
        assert layers and all(torch.equal(saved[n], snap[n.removeprefix("news_encoder.")]) for n in layers)
        assert any(n.startswith("user_encoder.") for n in saved)


def test_a_tampered_snapshot_is_refused(tmp_path, cache_dir, synthetic_small, pipeline_run, capsys):
    import shutil

    src = pipeline_run / "posttrain"
    dst = tmp_path / "runs" / "posttrain"
    shutil.copytree(src / "snapshots", dst / "snapshots")
    path = dst / "snapshots" / "teacher_2.safetensors"
    snap = read_snapshot(path)
    name = next(k for k in snap["delta"] if "layers" in k and k.endswith("weight"))
    snap["delta"][name] = snap["delta"][name] + 0.01  # another model's weights under this teacher's checksum
    save_file(snap["delta"], path, metadata={"format": snap["format"], "checksum": snap["checksum"],
                                             "meta": json.dumps(snap["meta"])})
    rc = main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=finetune_teachers",
                   f"distill.from_dir={tmp_path / 'runs'}"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "teacher teacher_2 does not hold the weights of" in err and "checksum" in err


def test_a_stage_without_its_inputs_says_what_to_run(tmp_path, cache_dir, synthetic_small, capsys):
    rc = main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=distill_posttrain"))
    assert rc == 2
    assert "run stage=posttrain first" in capsys.readouterr().err


def test_newsbert_trains_the_shared_layers_and_both_encoders(tmp_path, cache_dir, synthetic_small):
    from speedyrec.build import build_context, build_recommender
    from speedyrec.config import load_config
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.recipes.newsbert import NewsBertModel

    out = tmp_path / "nb"
    argv = args(out, cache_dir, synthetic_small, "stage=newsbert", "newsbert.teacher_init=plm")
    assert main(argv) == 0
    cfg = load_config(None, argv)
    ctx = build_context(cfg, DistInfo())
    initial = NewsBertModel(build_recommender(ctx, 4, 0, cfg.train.seed), build_recommender(ctx, 2, 0, cfg.train.seed))
    trained = read_snapshot(out / "newsbert/student.safetensors")["delta"]
    start = initial.student.state_dict()
    for prefix in ("news_encoder.pool.", "news_encoder.proj.", "user_encoder.", "news_encoder.backbone.layers.1."):
        names = [k for k in trained if k.startswith(prefix)]
        assert names and any(not torch.equal(trained[k], start[k]) for k in names), prefix
    teacher = read_snapshot(out / "newsbert/teacher.safetensors")["delta"]
    t_start = initial.teacher.state_dict()
    for layer in range(4):  # the teacher's own transformer trained too, every layer of it
        names = [k for k in teacher if k.startswith(f"news_encoder.backbone.layers.{layer}.")]
        assert names and any(not torch.equal(teacher[k], t_start[k]) for k in names), layer
    for k in ("news_encoder.pool.query", "news_encoder.proj.weight", "user_encoder.empty"):
        assert torch.equal(teacher[k], trained[k])  # one module, shared


def test_newsbert_applies_momentum_distillation_at_every_step(tmp_path, cache_dir, synthetic_small, monkeypatch):
    """The momentum update runs as the trainer's gradient hook: once per optimizer step, after the backward (every
    student layer has its gradient), with the configured beta; off (no hook) at newsbert.momentum=0."""
    from speedyrec.recipes import newsbert

    calls = []
    real = newsbert.momentum_gradients

    def recording(student_layers, teacher_layers, beta):
        calls.append((len(student_layers), len(teacher_layers), beta,
                      all(p.grad is not None for layer in student_layers for p in layer.parameters())))
        return real(student_layers, teacher_layers, beta)

    monkeypatch.setattr(newsbert, "momentum_gradients", recording)
    for beta in (0.3, 0.0):
        out = tmp_path / f"m{beta}"
        assert main(args(out, cache_dir, synthetic_small, "stage=newsbert", "newsbert.teacher_init=plm",
                         f"newsbert.momentum={beta}", "engine.token_budget=600")) == 0
        steps = read(out / "newsbert/stats.json")["steps"]
        assert steps == 3 and calls == [(2, 4, 0.3, True)] * steps


def test_newsbert_losses_count_only_the_rows_it_trains_not_the_cache_audits(tmp_path, cache_dir, synthetic_small):
    """The cache audit re-encodes hits twice without gradients; those passes must not join the hidden-state loss's
    rows (they would shrink the real rows' gradient): the run with the audit trains exactly as the run without."""
    runs = {}
    for audit in (0, 4):
        out = tmp_path / f"audit{audit}"
        assert main(args(out, cache_dir, synthetic_small, "stage=newsbert", "newsbert.teacher_init=plm",
                         "engine.cache_beta=1.0", "engine.cache_gamma=3", "engine.token_budget=600",
                         f"engine.cache_audit={audit}", "train.max_steps=4")) == 0
        runs[audit] = read(out / "newsbert/stats.json"), read(out / "newsbert/metrics.json")
    (stats, metrics), (plain_stats, plain_metrics) = runs[4], runs[0]
    assert stats["cache_hits"] > 0 and stats["cache_audit_rows"] > 0 and plain_stats["cache_audit_rows"] == 0
    for k in ("loss_hidden", "loss_ce", "loss_distill", "loss_user_mse", "loss_teacher_ce"):
        assert stats[k] == pytest.approx(plain_stats[k], rel=1e-6), k
    for name in ("student", "teacher"):  # the same metrics and the same trained weights (checksum)
        assert {k: v for k, v in metrics[name].items() if k != "seconds"} == \
            {k: v for k, v in plain_metrics[name].items() if k != "seconds"}


def test_newsbert_student_layers_must_divide_the_teachers(tmp_path, cache_dir, synthetic_small, capsys):
    rc = main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=newsbert", "distill.student_layers=3"))
    assert rc == 2
    assert "not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("bad, needle", [
    (("stage=posttrain", "eval.every=5"), "eval.every evaluates a click stage on dev impressions"),
    (("stage=distill_posttrain", "engine.buslm=true"), "engine.buslm sets how the click stages read a news"),
    (("model.layers=2",), "distill.student_layers"),
    (("posttrain.batch_size=9",), "must exceed posttrain.negatives"),
    (("stage=posttrain", "train.checkpoint_every=2"), "stage=posttrain keeps no mid-stage checkpoints"),
    (("distill.teachers=3",), "distill.teachers=3 reads the first 3 teachers, but post-training keeps"),
    (("distill.weighting=uniform", "distill.learn_omega=true"), "distill.weighting=uniform has no such weights"),
    (("distill.teachers=1", "distill.stage1_teachers=2"), "distill.stage1_teachers=2 exceeds the 1 teachers"),
    (("stage=distill_posttrain", "train.lr_schedule=linear"), "train.lr_schedule applies to the click stages")])
def test_distillation_config_errors(tmp_path, cache_dir, synthetic_small, capsys, bad, needle):
    rc = main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=pipeline", *bad))
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_two_gloo_ranks_post_train_like_one(tmp_path, cache_dir, synthetic_small):
    """Titles are gathered across ranks with autograd, so 2 ranks see the global batch's negatives and compute the
    single process's gradients: the snapshots agree. Then the rest of the pipeline runs on 2 ranks."""
    one, two = tmp_path / "one", tmp_path / "two"
    base = args(one, cache_dir, synthetic_small, "stage=posttrain", "posttrain.batch_size=15")
    assert main(base) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "speedyrec.train",
           *[a.replace(str(one), str(two)) for a in base[:-0 or None]]]
    cmd = [c for c in cmd if c != "stage=posttrain"] + ["stage=pipeline"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for k in (1, 2):
        a = read_snapshot(one / f"posttrain/snapshots/teacher_{k}.safetensors")["delta"]
        b = read_snapshot(two / f"posttrain/snapshots/teacher_{k}.safetensors")["delta"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=2e-4, rtol=1e-3, msg=name)
    for m in read(two / "metrics.json")["models"].values():
        check_click_metrics(m)


@pytest.mark.parametrize("stage, switch, losses", [
    ("distill_finetune", "distill.bank=false", ("loss_distill", "loss_emb", "loss_ce")),
    ("finetune_teachers", "engine.frozen_cache=false", ("loss_teacher_1", "loss_teacher_2")),
])
def test_the_fast_paths_change_the_cost_not_the_result(tmp_path, cache_dir, synthetic_small, pipeline_run, stage,
                                                       switch, losses):
    """The teacher bank against teachers run online in every step, and the shared frozen-layer caches against
    recomputing the frozen layers: the same losses and metrics."""
    runs = {}
    for name, extra in (("fast", []), ("naive", [switch])):
        out = tmp_path / name
        assert main(args(out, cache_dir, synthetic_small, f"stage={stage}", f"distill.from_dir={pipeline_run}",
                         "engine.cache=false", *extra)) == 0
        runs[name] = (read(out / stage / "stats.json"), read(out / stage / "metrics.json"))
    (fast, fm), (naive, nm) = runs["fast"], runs["naive"]
    for k in losses:
        assert fast[k] == pytest.approx(naive[k], rel=1e-4), k
    assert fast["clicks_trained"] == naive["clicks_trained"]
    for model in fm:
        for k in METRICS:
            assert fm[model][k] == pytest.approx(nm[model][k], abs=2e-3), (model, k)


def test_stage2_builds_its_own_bank_over_the_layers_its_teachers_share(tmp_path, cache_dir, synthetic_small,
                                                                       pipeline_run):
    """Stage II given another bank folder builds the bank itself: the two post-trained teachers share the PLM's
    bottom layer (post-training trained the top 3 of 4), which runs once for both, and its vectors are the ones
    finetune_teachers stored."""
    import numpy as np

    out, banks = tmp_path / "o", tmp_path / "banks"
    assert main(args(out, cache_dir, synthetic_small, "stage=distill_finetune", f"distill.from_dir={pipeline_run}",
                     f"distill.bank_dir={banks}")) == 0
    stats = read(out / "distill_finetune/stats.json")
    num_news = 750
    assert stats["teachers"] == 2 and stats["shared_frozen_layers"] == 1
    assert stats["bank_news_encoded"] == 2 * num_news
    built = sorted(banks.iterdir())
    assert len(built) == 2
    for d in built:
        stored = cache_dir / "banks" / d.name  # where the pipeline's finetune_teachers wrote the same teacher
        assert np.load(d / "filled.npy").all()
        np.testing.assert_allclose(np.load(d / "vectors.npy"), np.load(stored / "vectors.npy"), rtol=1e-4, atol=1e-5)
    # a second run reads the bank it built
    assert main(args(tmp_path / "again", cache_dir, synthetic_small, "stage=distill_finetune",
                     f"distill.from_dir={pipeline_run}", f"distill.bank_dir={banks}")) == 0
    assert read(tmp_path / "again/distill_finetune/stats.json")["bank_news_encoded"] == 0


@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated")  # gc.get_objects() touches it
@pytest.mark.parametrize("bank", [True, False])
def test_stage2_trains_without_the_teachers_plms_once_the_bank_is_built(tmp_path, cache_dir, synthetic_small,
                                                                        pipeline_run, monkeypatch, bank):
    """After the bank is built a step reads the bank's vectors and the teachers' user encoders only: when training
    starts, the only transformer alive is the student's (the naive way keeps the M teachers' PLMs, which it runs)."""
    import gc

    from speedyrec.engine.trainer import Trainer
    from speedyrec.models.backbone import BertFamilyBackbone

    alive = []
    fit = Trainer.fit

    def counting_fit(self, *a, **kw):
        gc.collect()
        alive.append(sorted(len(o.layers) for o in gc.get_objects() if isinstance(o, BertFamilyBackbone)))
        return fit(self, *a, **kw)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    assert main(args(tmp_path / "o", cache_dir, synthetic_small, "stage=distill_finetune",
                     f"distill.from_dir={pipeline_run}", f"distill.bank={str(bank).lower()}")) == 0
    assert alive == [[2]] if bank else alive == [[2, 4, 4]]


def test_two_gloo_ranks_finetune_teachers_and_stage2_in_bf16(tmp_path, cache_dir, synthetic_small, pipeline_run):
    """The M-teacher stack and Stage II on 2 ranks (uneven shards), bf16 autocast, global deduplication."""
    out = tmp_path / "ranks"
    (out / "distill_posttrain").mkdir(parents=True)
    (out / "distill_posttrain" / "student.safetensors").symlink_to(pipeline_run / "distill_posttrain" / "student.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    for stage, from_dir in (("finetune_teachers", pipeline_run), ("distill_finetune", out)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "speedyrec.train", *args(out, cache_dir, synthetic_small, f"stage={stage}", f"distill.from_dir={from_dir}",
                                        "train.amp=bf16", "engine.global_dedup=true", f"distill.bank_dir={tmp_path / 'banks'}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        stats = read(out / stage / "stats.json")
        check_engine_stats(stats)
        assert stats["world_size"] == 2
        for m in read(out / stage / "metrics.json").values():
            check_click_metrics(m)
    stage2 = read(out / "distill_finetune/stats.json")
    assert stage2["bank_news_encoded"] == 0  # built by the teachers' stage
    # loss means are over the clicks of both ranks: near chance, ln 2 for a click and 1 negative, as on one rank
    assert stage2["loss_ce"] == pytest.approx(math.log(2), abs=0.1)
    teachers = read(out / "finetune_teachers/stats.json")
    assert all(teachers[f"loss_{t}"] == pytest.approx(math.log(2), abs=0.15) for t in ("teacher_1", "teacher_2"))


class _Crash(RuntimeError):
    pass


def crash_after_checkpoint(monkeypatch, stage: str, step: int) -> None:
    """The process dies right after ``stage`` wrote its checkpoint of ``step`` (as a SIGKILL would leave it)."""
    from speedyrec.engine import checkpoint

    real = checkpoint.save

    def save(root, dist, at, shared, own, keep=0):
        path = real(root, dist, at, shared, own, keep)
        if root.parent.name == stage and at == step:
            raise _Crash(f"{stage} killed after step {step}")
        return path

    monkeypatch.setattr(checkpoint, "save", save)


def test_an_interrupted_pipeline_resumes_where_it_stopped_and_ends_as_an_uninterrupted_run(
        tmp_path, cache_dir, synthetic_small, monkeypatch):
    """Killed inside Stage II: train.resume=auto skips the finished steps (their outputs are complete) and
    continues Stage II from its newest checkpoint (same teachers, same bank); every model ends as in the
    uninterrupted pipeline."""
    ref, out = tmp_path / "straight", tmp_path / "interrupted"
    steps = ("engine.token_budget=1500", "train.checkpoint_every=1")  # several steps per click stage
    assert main(args(ref, cache_dir, synthetic_small, "stage=pipeline", *steps)) == 0
    run = args(out, cache_dir, synthetic_small, "stage=pipeline", *steps)
    crash_after_checkpoint(monkeypatch, "distill_finetune", 2)
    with pytest.raises(_Crash):
        main(run)
    assert not (out / "distill_finetune" / "done.json").exists() and (out / "finetune_teachers" / "done.json").exists()
    monkeypatch.undo()
    assert main([*run, "train.resume=auto"]) == 0
    log = (out / "train.log").read_text()
    for step in ("posttrain", "distill_posttrain", "finetune_teachers"):
        assert f"pipeline: {step} finished before" in log
    assert "resumed from" in log and "step_2" in log
    got, want = read(out / "metrics.json")["models"], read(ref / "metrics.json")["models"]
    assert set(got) == set(want)
    for name in want:
        for k in METRICS:
            assert got[name][k] == pytest.approx(want[name][k], abs=1e-6), (name, k)
    a, b = read(out / "distill_finetune" / "stats.json"), read(ref / "distill_finetune" / "stats.json")
    assert a["steps"] == b["steps"] == 3
    for k in ("clicks_trained", "news_encoded", "cache_hits", "loss_distill", "loss_ce"):
        assert a[k] == pytest.approx(b[k], rel=1e-9), k


@pytest.mark.parametrize("stage", ["finetune_teachers", "newsbert", "distill_finetune"])
def test_the_other_click_stages_resume_exactly(tmp_path, cache_dir, synthetic_small, pipeline_run, monkeypatch, stage):
    """Killed after its checkpoint of step 2, a stage resumes and ends as the uninterrupted run, its dev curve too
    (evaluated at every step: the checkpoint holds the evaluation of its own step)."""
    ref, out = tmp_path / "ref", tmp_path / "cut"
    common = (f"stage={stage}", f"distill.from_dir={pipeline_run}", "train.checkpoint_every=1", "train.max_steps=4",
              "engine.token_budget=1500", "eval.every=1")
    assert main(args(ref, cache_dir, synthetic_small, *common)) == 0
    crash_after_checkpoint(monkeypatch, stage, 2)
    with pytest.raises(_Crash):
        main(args(out, cache_dir, synthetic_small, *common))
    monkeypatch.undo()
    assert main(args(out, cache_dir, synthetic_small, *common, "train.resume=auto")) == 0
    ma, mb = read(ref / stage / "metrics.json"), read(out / stage / "metrics.json")
    for model in ma:
        for k in METRICS:
            assert ma[model][k] == pytest.approx(mb[model][k], abs=1e-6), (model, k)
    sa, sb = read(ref / stage / "stats.json"), read(out / stage / "stats.json")
    assert sa["steps"] == 4
    assert {k: sa[k] for k in ("clicks_trained", "steps", "cache_hits")} == {k: sb[k] for k in ("clicks_trained", "steps", "cache_hits")}
    ca, cb = (read(d / stage / "dev_curve.json")["points"] for d in (ref, out))
    assert [p["step"] for p in ca] == [p["step"] for p in cb] == [1, 2, 3, 4]
    def flat(point):  # every metric and count of a point, by model; times differ
        items = [((k, m), x) for k, v in point.items() if isinstance(v, dict) for m, x in v.items()]
        items += [((k, ""), v) for k, v in point.items() if not isinstance(v, dict)]
        return {key: x for key, x in items if not {"seconds", "train_seconds"} & set(key)}

    for a, b in zip(ca, cb):
        assert flat(b) == pytest.approx(flat(a), abs=1e-6)


def test_a_checkpoint_of_other_teachers_is_refused(tmp_path):
    from speedyrec.config import Config, ConfigError
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.engine.trainer import Trainer
    from speedyrec.recipes.resume import StageCheckpoints

    cfg = Config()
    model = torch.nn.Linear(3, 2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DistInfo(), log_every=0)
    StageCheckpoints(cfg, DistInfo(), tmp_path, identity={"teachers": ["aaa", "bbb"]}).save(trainer)
    cfg.train.resume = "auto"
    with pytest.raises(ConfigError, match="teachers"):
        StageCheckpoints(cfg, DistInfo(), tmp_path, identity={"teachers": ["aaa", "ccc"]}).resume(trainer)
    assert StageCheckpoints(cfg, DistInfo(), tmp_path, identity={"teachers": ["aaa", "bbb"]}).resume(trainer) is not None


def test_teachers_from_reuses_the_teachers_and_changes_nothing_else(tmp_path, cache_dir, synthetic_small, pipeline_run):
    """A pipeline linking another's post-training and finetuned teachers trains the same student as that
    pipeline did (same settings), without touching the teachers; a 1-layer student learns from them too, under
    another heap-trim cadence (housekeeping, not a setting the teachers depend on)."""
    before = {p: p.read_bytes() for p in (pipeline_run / "finetune_teachers").rglob("*.safetensors")}
    same = tmp_path / "same"
    assert main(args(same, cache_dir, synthetic_small, "stage=pipeline", f"pipeline.teachers_from={pipeline_run}")) == 0
    for step in ("posttrain", "finetune_teachers"):
        assert (same / step).is_symlink() and (same / step).resolve() == (pipeline_run / step).resolve()
    ref, got = read(pipeline_run / "metrics.json"), read(same / "metrics.json")
    assert got["linked"] == ["posttrain", "finetune_teachers"]
    assert set(got["seconds"]) == {"distill_posttrain", "distill_finetune"}
    for name in ("student", "teacher_1", "teacher_2"):
        assert got["models"][name] == ref["models"][name], name
    assert {p: p.read_bytes() for p in (pipeline_run / "finetune_teachers").rglob("*.safetensors")} == before
    assert "linked from" in (same / "pipeline.md").read_text()

    one = tmp_path / "one"
    assert main(args(one, cache_dir, synthetic_small, "stage=pipeline", "pipeline.baselines=true",
                     "distill.student_layers=1", f"pipeline.teachers_from={pipeline_run}",
                     "train.heap_trim_every=7", "engine.prefetch=2")) == 0  # housekeeping: no reason to refuse them
    models = read(one / "metrics.json")["models"]
    assert {models[n]["layers"] for n in ("student", "student_plain", "newsbert_student")} == {1}
    check_click_metrics(models["newsbert_student"])


@pytest.mark.parametrize("extra, needle", [
    (("posttrain.teachers=3",), "its teachers were trained with other settings (posttrain.teachers: 2 there, 3 here)"),
    (("teachers_from=missing",), "its posttrain step has not finished"),
    (("distill.student_layers=3", "pipeline.baselines=true"), "does not split into blocks for a 3-layer student"),
    (("newsbert.teacher_layers=2", "pipeline.baselines=true"), "holds every layer of the PLM; leave newsbert.teacher_layers"),
    (("engine.negatives=2",), "other settings (engine.negatives: 1 there, 2 here)"),
    # early stopping decides where the teachers' training ended
    (("eval.every=1", "eval.patience=1"), "eval.patience: 0 there, 1 here")])
def test_teachers_from_and_newsbert_refusals_come_before_any_training(tmp_path, cache_dir, synthetic_small,
                                                                      pipeline_run, capsys, extra, needle):
    src = tmp_path / "missing" if extra[0] == "teachers_from=missing" else pipeline_run
    extra = tuple(e for e in extra if e != "teachers_from=missing")
    out = tmp_path / "o"
    rc = main(args(out, cache_dir, synthetic_small, "stage=pipeline", f"pipeline.teachers_from={src}", *extra))
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (out / "distill_posttrain").exists()


def test_distill_teachers_reads_the_first_m_teachers_of_a_linked_run(tmp_path, cache_dir, synthetic_small,
                                                                     pipeline_run):
    """distill.teachers=1 over a 2-teacher run: both stages read teacher 1 only (their model files name it, their
    stats count it), and the linked teachers are left as they were."""
    out = tmp_path / "m1"
    assert main(args(out, cache_dir, synthetic_small, "stage=pipeline", "distill.teachers=1",
                     f"pipeline.teachers_from={pipeline_run}")) == 0
    stage1 = read_snapshot(out / "distill_posttrain/student.safetensors")["meta"]["teachers"]
    stage2 = read_snapshot(out / "distill_finetune/student.safetensors")["meta"]["teachers"]
    assert [Path(f).name for f in stage1] == ["teacher_1.safetensors"]
    assert [Path(f).name for f in stage2] == ["teacher_1.safetensors"]
    assert read(out / "distill_posttrain/stats.json")["teachers"] == 1
    assert read(out / "distill_finetune/stats.json")["teachers"] == 1
    check_click_metrics(read(out / "metrics.json")["models"]["student"])


def test_the_first_snapshots_of_a_longer_post_training_are_a_shorter_ones(tmp_path, cache_dir, synthetic_small):
    """What distill.teachers=M stands for: a post-training that keeps 3 snapshots has, as its first 2, the very
    snapshots a run keeping 2 has (same seed), so benchmarks.teacher_count post-trains once for every M."""
    sums = {}
    for m in (2, 3):
        out = tmp_path / f"p{m}"
        assert main(args(out, cache_dir, synthetic_small, "stage=posttrain", f"posttrain.teachers={m}")) == 0
        sums[m] = [s["checksum"] for s in read(out / "posttrain/metrics.json")["snapshots"]]
    assert len(sums[3]) == 3 and sums[3][:2] == sums[2]


@pytest.mark.parametrize("weighting", ["per_sample", "uniform"])
def test_uniform_weighting_gives_every_teacher_one_mth_in_both_stages(tmp_path, cache_dir, synthetic_small,
                                                                     pipeline_run, monkeypatch, weighting):
    """distill.weighting=uniform: the weights the distillation loss of Stage I and Stage II receives are 1/M for
    every sample; per_sample (the default) varies them by each teacher's loss."""
    import speedyrec.recipes.distill_finetune as stage2
    import speedyrec.recipes.distill_posttrain as stage1

    seen = {}

    def spy(name, real):
        def loss(student_logits, teacher_logits, weights, temperature):
            seen.setdefault(name, []).append(weights.detach().clone())
            return real(student_logits, teacher_logits, weights, temperature)
        return loss

    monkeypatch.setattr(stage1, "distillation_loss", spy("stage1", stage1.distillation_loss))
    monkeypatch.setattr(stage2, "distillation_loss", spy("stage2", stage2.distillation_loss))
    out = tmp_path / weighting
    assert main(args(out, cache_dir, synthetic_small, "stage=pipeline", f"distill.weighting={weighting}",
                     f"pipeline.teachers_from={pipeline_run}")) == 0
    for name in ("stage1", "stage2"):
        w = torch.cat(seen[name])  # [samples, M = 2]
        assert w.shape[1] == 2 and torch.allclose(w.sum(1), torch.ones(len(w)))
        if weighting == "uniform":
            assert torch.equal(w, torch.full_like(w, 0.5)), name
        else:
            assert (w - 0.5).abs().max() > 1e-3, name
