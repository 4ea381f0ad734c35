"""Tiny-NewsRec's Table 4 methods: the multi-teacher losses against slow, obviously correct loops (layer mapping,
attention scores and their MSE, per-news weights from per-sample ones), and NewsBERT-MT and MT-BERT end to end on a
tiny random encoder, NewsBERT-MT with two identical teachers equal to stage=newsbert, loss for loss; TinyBERT-MT's
intermediate losses in both distillation stages; benchmarks.kd_methods measured across sessions (jobs recorded in
its results file and ledger are reused), on fake training jobs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_distill_e2e import args, check_click_metrics, check_engine_stats, read

from speedyrec.config import ConfigError, load_config
from speedyrec.distill.losses import (attention_mse, block_layers, candidate_rows, intermediate_loss,
                                      momentum_gradients, news_teacher_weights, weighted_news_loss)
from speedyrec.distill.snapshots import read_snapshot
from speedyrec.engine.loss import TargetIndex
from speedyrec.train import main


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache of this module's own: its teacher banks would otherwise be found by test_distill_e2e's pipeline of
    the same teachers, which counts the news its teacher stage encodes into the bank (run after this module, it
    failed)."""
    return tmp_path_factory.mktemp("kd_methods_cache")


def test_block_layers_map_student_layers_to_the_ends_of_teacher_blocks():
    assert block_layers(2, 6) == [0, 3, 6] and block_layers(1, 4) == [0, 4] and block_layers(3, 3) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        block_layers(4, 6)


def slow_attention_mse(a, b, mask):
    out = []
    for r in range(a.shape[0]):
        total, n = 0.0, 0
        for h in range(a.shape[1]):
            for i in range(a.shape[2]):
                for j in range(a.shape[3]):
                    if mask[r, i] and mask[r, j]:
                        total += float(a[r, h, i, j] - b[r, h, i, j]) ** 2
                        n += 1
        out.append(total / max(n, 1))
    return out


def test_attention_mse_over_real_token_pairs_by_loop():
    torch.manual_seed(0)
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert attention_mse(a, b, mask).tolist() == pytest.approx(slow_attention_mse(a, b, mask), rel=1e-5)


def test_attention_scores_are_the_layers_own_softmax_input():
    """softmax(scores + mask) of a layer is the attention HF's own layer computes (its attention probabilities)."""
    from transformers import BertConfig, BertModel

    from speedyrec.models.backbone import BertFamilyBackbone

    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32, attn_implementation="eager"), add_pooling_layer=False).eval()
    bb = BertFamilyBackbone(hf).eval()
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    states = bb.hidden_states(ids, mask)
    want = hf(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions
    for i in range(2):
        scores = bb.attention_scores(i, states[i]).masked_fill(~mask[:, None, None, :], float("-inf"))
        got = torch.softmax(scores, -1)
        assert torch.allclose(got[0], want[i][0], atol=1e-5)
        assert torch.allclose(got[1, :, :3], want[i][1, :, :3], atol=1e-5)  # the real queries of the padded row


def test_intermediate_loss_compares_each_student_layer_with_the_end_of_its_teacher_block():
    torch.manual_seed(1)
    r, t, h, a = 2, 3, 4, 2
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    s_states = [torch.randn(r, t, h) for _ in range(3)]  # N = 2
    t_states = [torch.randn(r, t, h) for _ in range(5)]  # 4 teacher layers: K = 2
    s_att = [torch.randn(r, a, t, t) for _ in range(2)]
    t_att = [torch.randn(r, a, t, t) for _ in range(2)]  # teacher layers 2 and 4

    def mse(x, y, row):
        n = int(mask[row].sum())
        return float((x[row, :n] - y[row, :n]).pow(2).mean())

    want = [mse(s_states[0], t_states[0], row) + mse(s_states[1], t_states[2], row) + mse(s_states[2], t_states[4], row)
            + sum(slow_attention_mse(s_att[i], t_att[i], mask)[row] for i in range(2)) for row in range(r)]
    assert intermediate_loss(s_states, s_att, t_states, t_att, mask).tolist() == pytest.approx(want, rel=1e-5)


def test_news_weights_are_the_mean_weight_of_the_targets_that_score_each_news():
    clicks = torch.tensor([[0, 1, 2], [3, 4, -1]])
    negatives = torch.tensor([[[5], [0], [1]], [[2], [5], [-1]]])
    targets = TargetIndex.from_mask(clicks >= 0)
    rows = candidate_rows(clicks, negatives, targets)
    assert rows.tolist() == [[0, 5], [1, 0], [2, 1], [3, 2], [4, 5]]
    w = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    got = news_teacher_weights(w, rows, 7)
    for news in range(7):
        scoring = [t for t in range(5) if news in rows[t].tolist()]
        expect = (w[scoring].mean(0) if scoring else w.mean(0)).tolist()
        assert got[news].tolist() == pytest.approx(expect), news
    assert torch.allclose(got.sum(-1), torch.ones(7))
    # the step's news losses: the weighted sum over the rows encoded, as a mean per target
    losses = torch.rand(3, 2)
    encoded = torch.tensor([0, 6, 2])
    want = sum(float(got[encoded[i]] @ losses[i]) for i in range(3)) * 5 / 3
    assert weighted_news_loss([(encoded[:2], losses[:2]), (encoded[2:], losses[2:])], got, 5).item() == \
        pytest.approx(want)


def test_momentum_of_several_teachers_takes_the_mean_over_their_blocks():
    student = [torch.nn.Linear(2, 1, bias=False) for _ in range(2)]
    teachers = [[torch.nn.Linear(2, 1, bias=False) for _ in range(4)] for _ in range(2)]
    for i, layer in enumerate(student):
        layer.weight.grad = torch.full((1, 2), float(i + 1))
    for m, layers in enumerate(teachers):
        for j, layer in enumerate(layers):
            layer.weight.grad = torch.full((1, 2), 10.0 * (j + 1) + 100.0 * m)
    momentum_gradients(student, teachers, beta=0.15)
    # student layer 0 <- teachers' blocks (0, 1): (10 + 20 + 110 + 120) / 4 = 65; layer 1 <- (2, 3): 85
    assert student[0].weight.grad.flatten().tolist() == pytest.approx([0.85 * 1 + 0.15 * 65] * 2)
    assert student[1].weight.grad.flatten().tolist() == pytest.approx([0.85 * 2 + 0.15 * 85] * 2)


def test_table4_settings_that_cannot_work_are_refused():
    for bad, words in ((["stage=newsbert", "newsbert.teachers=2", "newsbert.teacher_init=plm"], "copies of one"),
                       (["stage=newsbert", "newsbert.teachers=0"], "newsbert.teachers"),
                       (["stage=finetune_teachers", "teachers.init=plm", "teachers.seeds=true"], "teachers.init=plm"),
                       (["stage=pipeline", "teachers.init=plm"], "teachers.init=plm"),
                       (["stage=pipeline", "distill.intermediate_weight=1", "engine.buslm=true"], "BusLM"),
                       (["stage=distill_finetune", "distill.intermediate_weight=1", "distill.distill_weight=0",
                         "distill.emb_weight=0"], "per sample")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, bad)


@pytest.fixture(scope="module")
def posttrained(tmp_path_factory, cache_dir, synthetic_small):
    out = tmp_path_factory.mktemp("kd_posttrain")
    assert main(args(out, cache_dir, synthetic_small, "stage=posttrain")) == 0
    return out


def losses(out) -> dict:
    return {k: v for k, v in read(out / "newsbert/stats.json").items() if k.startswith("loss_")}


def test_newsbert_mt_with_two_identical_teachers_is_newsbert_loss_for_loss(tmp_path, cache_dir, synthetic_small,
                                                                          posttrained):
    """Two teachers from the same snapshot weigh 1/2 each on every target and news: the first step's losses (before
    any update) equal one teacher's, that is stage=newsbert's."""
    twin = tmp_path / "twin"
    shutil.copytree(posttrained / "posttrain", twin / "posttrain")
    shutil.copy(twin / "posttrain/snapshots/teacher_2.safetensors", twin / "posttrain/snapshots/teacher_1.safetensors")
    one, two = tmp_path / "one", tmp_path / "two"
    for out, m in ((one, 1), (two, 2)):
        assert main(args(out, cache_dir, synthetic_small, "stage=newsbert", f"distill.from_dir={twin}",
                         f"newsbert.teachers={m}", "train.max_steps=1")) == 0
    a, b = losses(one), losses(two)
    assert set(a) == set(b) and a["loss_hidden"] > 0
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_newsbert_mt_and_mt_bert_end_to_end(tmp_path, cache_dir, synthetic_small, posttrained):
    """NewsBERT-MT: the last 2 snapshots as teachers; MT-BERT: 2 teachers finetuned from the plain PLM with 2 seeds,
    then jointly trained with the student. Each student differs from NewsBERT's one-teacher student."""
    single, multi, mt = tmp_path / "single", tmp_path / "multi", tmp_path / "mt"
    common = ("stage=newsbert", f"distill.from_dir={posttrained}")
    assert main(args(single, cache_dir, synthetic_small, *common)) == 0
    assert main(args(multi, cache_dir, synthetic_small, *common, "newsbert.teachers=2")) == 0
    m = read(multi / "newsbert/metrics.json")
    assert set(m) == {"student", "teacher_1", "teacher_2"}
    for v in m.values():
        check_click_metrics(v)
    stats = read(multi / "newsbert/stats.json")
    check_engine_stats(stats)
    assert stats["teachers"] == 2 and all(stats[k] > 0 for k in ("loss_distill", "loss_hidden", "loss_user_mse"))
    starts = [read_snapshot(multi / f"newsbert/teacher_{k}.safetensors")["meta"]["teacher_from"] for k in (1, 2)]
    assert [s.rsplit("/", 1)[1] for s in starts] == ["teacher_1.safetensors", "teacher_2.safetensors"]
    students = {read(out / "newsbert/metrics.json")["student"]["checksum"] for out in (single, multi)}
    # MT-BERT: the teachers without post-training, finetuned once, then the joint stage
    assert main(args(mt, cache_dir, synthetic_small, "stage=finetune_teachers", "teachers.init=plm")) == 0
    t = read(mt / "finetune_teachers/metrics.json")
    assert {k for k in t if k != "ensemble"} == {"teacher_1", "teacher_2"}
    assert {read_snapshot(t[k]["path"])["meta"]["from"] for k in ("teacher_1", "teacher_2")} == {"plm"}
    assert main(args(mt, cache_dir, synthetic_small, "stage=newsbert", "newsbert.teachers=2",
                     "newsbert.teacher_init=finetuned")) == 0
    s = read(mt / "newsbert/stats.json")
    check_engine_stats(s)
    assert s["teachers"] == 2 and math.isfinite(s["loss_hidden"])
    students.add(read(mt / "newsbert/metrics.json")["student"]["checksum"])
    assert len(students) == 3


def test_intermediate_distillation_maps_each_student_layer_to_its_teacher_block_end():
    """Each teacher's losses per news are the student's states against teacher states 0, 2, 4 and its attention
    scores against teacher layers 2 and 4 (a 2-layer student of 4-layer teachers), computed here layer by layer."""
    from transformers import BertConfig, BertModel

    from speedyrec.distill.intermediate import IntermediateDistillation
    from speedyrec.models.backbone import BertFamilyBackbone
    from speedyrec.models.recommender import NewsEncoder

    def encoder(layers, seed):
        torch.manual_seed(seed)
        hf = BertModel(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=16, hidden_dropout_prob=0, attention_probs_dropout_prob=0),
                       add_pooling_layer=False)
        return NewsEncoder(BertFamilyBackbone(hf), 6, 5).eval()

    teachers = [encoder(4, 1), encoder(4, 2)]
    student = encoder(2, 3)
    ids = torch.randint(1, 40, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    inter = IntermediateDistillation([(t, None) for t in teachers], 2)
    assert inter.map == [0, 2, 4]
    vec, got = inter.losses(student, None, ids, mask, None)
    assert got.shape == (3, 2) and torch.allclose(vec, student(ids, mask), atol=1e-5)
    with torch.no_grad():
        check_against_layers(student, teachers, ids, mask, got)
    with pytest.raises(ConfigError, match="blocks"):
        IntermediateDistillation([(t, None) for t in teachers], 3)


def check_against_layers(student, teachers, ids, mask, got):
    s = student.backbone.hidden_states(ids, mask)
    for i, t in enumerate(teachers):
        ts = t.backbone.hidden_states(ids, mask)
        for row in range(3):
            n = int(mask[row].sum())
            want = sum(float((s[a][row, :n] - ts[b][row, :n]).pow(2).mean()) for a, b in ((0, 0), (1, 2), (2, 4)))
            for a, b in ((1, 2), (2, 4)):  # student layer a's attention against teacher layer b's
                sa = student.backbone.attention_scores(a - 1, s[a - 1])[row, :, :n, :n]
                ta = t.backbone.attention_scores(b - 1, ts[b - 1])[row, :, :n, :n]
                want += float((sa - ta).pow(2).mean())
            assert got[row, i].item() == pytest.approx(want, rel=1e-4), (row, i)


def test_tinybert_mt_trains_intermediate_losses_in_both_stages(tmp_path, cache_dir, synthetic_small, posttrained):
    """TinyBERT-MT is the pipeline with distill.intermediate_weight (and TinyBERT's loss set): both stages train the
    intermediate losses, weighted per sample, and its student differs from Tiny-NewsRec's on the same teachers."""
    base, tiny = tmp_path / "base", tmp_path / "tinybert"
    assert main(args(base, cache_dir, synthetic_small, "stage=pipeline")) == 0
    assert main(args(tiny, cache_dir, synthetic_small, "stage=pipeline", f"pipeline.teachers_from={base}",
                     "distill.intermediate_weight=1", "distill.emb_weight=0", "distill.ce_weight_dp=0",
                     "distill.ce_weight_ft=0")) == 0
    for stage in ("distill_posttrain", "distill_finetune"):
        stats = read(tiny / stage / "stats.json")
        assert stats["loss_intermediate"] > 0 and stats["loss_distill"] > 0 and "loss_emb" not in stats, stage
    check_engine_stats(read(tiny / "distill_finetune/stats.json"))
    check_click_metrics(read(tiny / "metrics.json")["models"]["student"])
    students = [read(out / "distill_finetune/metrics.json")["student"]["checksum"] for out in (base, tiny)]
    assert students[0] != students[1]


def test_kd_methods_table_pairs_seeds_and_says_what_agrees_with_the_paper():
    from benchmarks.kd_methods import ROWS, summarise, verdict

    auc = {"ensemble": (0.60, 0.62), "tinybert_mt": (0.58, 0.59), "newsbert_mt": (0.56, 0.60),
           "mt_bert": (0.55, 0.56), "tiny_newsrec": (0.61, 0.63)}
    per_seed = {s: {name: {"auc": auc[name][s], "mrr": 0.3, "ndcg5": 0.3, "ndcg10": 0.4} for name, _ in ROWS}
                for s in (0, 1)}
    per_seed[1]["mt_bert"]["auc"] = 0.70  # MT-BERT beats Tiny-NewsRec on seed 1 only
    table, paired = summarise(per_seed)
    assert table["tiny_newsrec"]["auc"]["mean"] == pytest.approx(0.62)
    assert paired["ensemble"]["auc"]["mean"] == pytest.approx(-0.01)
    assert paired["ensemble"]["auc"]["std"] == pytest.approx(0, abs=1e-12)
    assert paired["mt_bert"]["auc"]["mean"] == pytest.approx((-0.06 + 0.07) / 2)
    lines = verdict(table, paired, 2, quick=False)
    said = {name: next(line for line in lines if line.startswith(f"- {label}:")) for name, label in ROWS[:-1]}
    assert "Agrees: below Tiny-NewsRec" in said["ensemble"] and "spread" not in said["ensemble"]
    assert "Disagrees" in said["mt_bert"] and "within the seeds' spread" in said["mt_bert"]
    assert any("the worst is NewsBERT-MT (58.00): disagrees" in line for line in lines)
    assert any("here it is MT-BERT (62.50): disagrees" in line for line in lines)
    # with the seeds: both are within their spread of the runner-up, and of the paper's row: undecided
    lines = verdict(table, paired, 2, quick=False, per_seed=per_seed)
    assert any("the worst is NewsBERT-MT (58.00) (not told apart from TinyBERT-MT: paired -0.50 ± 2.12): undecided: "
               "the paper's MT-BERT is not told apart from it (paired +4.50 ± 7.78)." in line for line in lines)
    assert any("here it is MT-BERT (62.50) (not told apart from Tiny-NewsRec: paired +0.50 ± 9.19): undecided: the "
               "seeds do not order the two." in line for line in lines)
    # another row clearly below the paper's worst on every seed: a disagreement
    for seed, (newsbert, mt_bert) in enumerate(((0.56, 0.57), (0.565, 0.58))):
        per_seed[seed]["newsbert_mt"]["auc"], per_seed[seed]["mt_bert"]["auc"] = newsbert, mt_bert
    lines = verdict(*summarise(per_seed), 2, quick=False, per_seed=per_seed)
    assert any("the worst is NewsBERT-MT (56.25)" in line and line.endswith(": disagrees.") for line in lines)
    # now MT-BERT is below the others on both seeds
    for seed, (newsbert, mt_bert) in enumerate(((0.56, 0.55), (0.60, 0.57))):  # NewsBERT-MT as before
        per_seed[seed]["newsbert_mt"]["auc"], per_seed[seed]["mt_bert"]["auc"] = newsbert, mt_bert
    lines = verdict(*summarise(per_seed), 2, quick=False, per_seed=per_seed)
    assert any("the worst is MT-BERT (56.00) (paired against NewsBERT-MT: -2.00 ± 1.41): agrees." in line
               for line in lines)
    assert any("here it is Tiny-NewsRec (62.00) (paired against Ensemble-Teacher: +1.00 ± 0.00): agrees." in line
               for line in lines)
    # MT-BERT the lowest by its mean, but NewsBERT-MT not told apart from it: the paper's row, yet undecided
    for seed, (newsbert, mt_bert) in enumerate(((0.56, 0.55), (0.57, 0.575))):
        per_seed[seed]["newsbert_mt"]["auc"], per_seed[seed]["mt_bert"]["auc"] = newsbert, mt_bert
    lines = verdict(*summarise(per_seed), 2, quick=False, per_seed=per_seed)
    assert any("the worst is MT-BERT (56.25) (not told apart from NewsBERT-MT: paired -0.25 ± 1.06): undecided: the "
               "paper's row by its mean, but the seeds do not order the two." in line for line in lines)


def kd_jobs(seed: int) -> list[str]:
    """benchmarks.kd_methods' jobs of a seed, in the order they run."""
    return [f"base_seed_{seed}", f"seed_{seed}_tinybert_mt", f"seed_{seed}_newsbert_mt",
            f"seed_{seed}_mt_bert_teachers", f"seed_{seed}_mt_bert"]


@pytest.fixture
def fake_kd(tmp_path, monkeypatch):
    """benchmarks.kd_methods with its results in tmp_path/results and training jobs that record their names, make
    their folders, refuse to start without the folder they read (as the stages do) and return fabricated metrics.
    A job named in ``fail`` raises before it runs: a session ending mid-seed."""
    import benchmarks.common as common
    import benchmarks.kd_methods as kd
    import benchmarks.quality as quality

    results = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.setattr(kd, "_plot", lambda *a: None)
    ran, fail = [], set()

    def metrics(auc):
        return {"auc": auc, "mrr": 0.3, "ndcg5": 0.4, "ndcg10": 0.5}

    def fake_run_job(name, overrides, root, **kw):
        if name in fail:
            raise RuntimeError(f"{name}: the session ended")
        for o in overrides:
            if o.startswith(("distill.from_dir=", "pipeline.teachers_from=")):
                assert Path(o.split("=", 1)[1]).is_dir(), f"{name} reads {o}, which is not there"
        ran.append(name)
        seed = int(next(o for o in overrides if o.startswith("train.seed=")).split("=")[1])
        (root / name / "finetune_teachers").mkdir(parents=True, exist_ok=True)
        (root / name / "finetune_teachers" / "done.json").write_text("{}")
        if name.startswith("base_seed_"):
            out = {"models": {"ensemble": metrics(0.70 + seed / 100), "student": metrics(0.69 + seed / 100)}}
        elif name.endswith("_tinybert_mt"):
            out = {"models": {"student": metrics(0.68)}}
        elif name.endswith("_mt_bert_teachers"):
            out = {"teacher_1": metrics(0.6), "teacher_2": metrics(0.6)}
        else:
            out = {"student": metrics(0.66 if name.endswith("_mt_bert") else 0.67)}
        return {"name": name, "command": "-m speedyrec.train " + " ".join(overrides), "metrics": out,
                "process_seconds": 60.0, "commit": "abc1234"}

    monkeypatch.setattr(common, "run_job", fake_run_job)
    monkeypatch.setattr(quality, "run_job", fake_run_job)
    return kd, ran, fail, results


def test_kd_methods_reuses_recorded_seeds_and_adds_new_ones(tmp_path, fake_kd):
    """A seed takes hours and --out dies with the session: a later session's --seeds 1 runs seed 1's jobs only and
    tabulates seed 0 from the results file; --kept-only runs nothing and names the seeds missing; --fresh runs
    again."""
    kd, ran, _, results = fake_kd
    kd.main(["--seeds", "0", "--out", str(tmp_path / "session1")])
    assert ran == kd_jobs(0)
    saved = json.loads((results / "kd_methods.json").read_text())
    assert set(saved["runs"]) == set(kd_jobs(0)) and saved["seeds"] == [0]
    assert saved["runs"]["seed_0_newsbert_mt"]["overrides"][:2] == ["stage=newsbert", "newsbert.teachers=4"]
    assert not (results / "ledger" / "kd_methods.json").exists()  # the results file holds every job
    ran.clear()
    payload = kd.main(["--seeds", "1", "--out", str(tmp_path / "session2")])
    assert ran == kd_jobs(1)  # nothing of seed 0 ran, not even its base run
    assert payload["seeds"] == [0, 1] and set(payload["runs"]) == set(kd_jobs(0) + kd_jobs(1))
    assert payload["table"]["ensemble"]["auc"]["mean"] == pytest.approx(0.705)
    assert payload["paired"]["mt_bert"]["auc"]["mean"] == pytest.approx(0.66 - 0.695)
    md = (results / "kd_methods.md").read_text()
    assert "2 seed(s)" in md and "Total wall time 10.0 min" in md  # 10 jobs of 60 s, run in two sessions
    ran.clear()
    payload = kd.main(["--seeds", "0,1,2", "--kept-only", "--out", str(tmp_path / "session3")])
    assert ran == [] and payload["seeds"] == [0, 1]
    assert payload["missing"] == {"2": [name for name, _ in kd.ROWS]}
    assert "Seed 2 is left out of the tables: Ensemble-Teacher, TinyBERT-MT" in (results / "kd_methods.md").read_text()
    payload = kd.main(["--seeds", "0", "--fresh", "--out", str(tmp_path / "session4")])
    assert ran == kd_jobs(0) and payload["seeds"] == [0]


@pytest.mark.parametrize("ended_at, rerun", [
    ("seed_0_newsbert_mt", ["base_seed_0", "seed_0_newsbert_mt", "seed_0_mt_bert_teachers", "seed_0_mt_bert"]),
    ("seed_0_mt_bert", ["seed_0_mt_bert_teachers", "seed_0_mt_bert"])])
def test_kd_methods_continues_a_seed_from_its_ledger(tmp_path, fake_kd, capsys, ended_at, rerun):
    """A session that ends mid-seed leaves its finished jobs in the ledger: the next session runs the rest, and the
    job each of those reads (the base run's teachers, MT-BERT's teachers) again, as its folder is gone."""
    kd, ran, fail, results = fake_kd
    fail.add(ended_at)
    with pytest.raises(RuntimeError, match="the session ended"):
        kd.main(["--seeds", "0", "--out", str(tmp_path / "session1")])
    ledger = results / "ledger" / "kd_methods.json"
    assert set(json.loads(ledger.read_text())["runs"]) == set(ran) and not (results / "kd_methods.json").exists()
    fail.clear()
    ran.clear()
    with pytest.raises(SystemExit, match="seed 0: .*MT-BERT"):
        kd.main(["--seeds", "0", "--kept-only", "--out", str(tmp_path / "session2")])
    assert ran == []
    payload = kd.main(["--seeds", "0", "--out", str(tmp_path / "session3")])
    assert ran == rerun and payload["seeds"] == [0] and set(payload["runs"]) == set(kd_jobs(0))
    assert not ledger.exists()  # the results file holds its jobs now
    assert ("running base_seed_0 again" in capsys.readouterr().out) == ("base_seed_0" in rerun)
