"""benchmarks.teacher_count (Tiny-NewsRec's Figure 2): what its rows stand for on a tiny encoder (the first M
snapshots and finetuned teachers of a longer run are an M-teacher run's; each snapshot records the seconds it took),
and its harness on fabricated runs: the settings of every run, the links to the seed's 6-teacher run, the cost
arithmetic, the differences paired by seed, the verdict, and reuse of recorded runs (its --quick run takes minutes:
run by hand)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_distill_e2e import args, read

import benchmarks.common as common
import benchmarks.quality as quality
import benchmarks.teacher_count as tc
from speedyrec.distill.snapshots import read_snapshot
from speedyrec.train import main as train

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")


@pytest.fixture(scope="module")
def posttrained(tmp_path_factory, cache_dir, synthetic_small) -> dict:
    """Post-training keeping 2 and 3 snapshots, and the teachers each finetunes: {M: out_dir}."""
    outs = {}
    for m in (2, 3):
        out = outs[m] = tmp_path_factory.mktemp(f"teachers{m}")
        assert train(args(out, cache_dir, synthetic_small, "stage=posttrain", f"posttrain.teachers={m}")) == 0
        # a bank of their own: teachers equal bit for bit to another module's (same settings) share their bank
        # files in the session's cache, which would change what that module's bank counters read
        assert train(args(out / "ft", cache_dir, synthetic_small, "stage=finetune_teachers", f"posttrain.teachers={m}",
                          f"distill.from_dir={out}", f"distill.bank_dir={out / 'banks'}")) == 0
    return outs


def test_each_snapshot_records_the_seconds_post_training_took_to_reach_it(posttrained):
    """A snapshot's seconds are the stage's time so far, its setup included (what a run keeping k snapshots takes),
    growing with k; they stay out of the snapshot's file (a file is the same in any run)."""
    snaps = read(posttrained[3] / "posttrain/metrics.json")["snapshots"]
    seconds = [s["seconds"] for s in snaps]
    assert [s["step"] for s in snaps] == [3, 5, 7]
    assert read(posttrained[3] / "posttrain/stats.json")["setup_seconds"] < seconds[0] < seconds[1] < seconds[2]
    meta = read_snapshot(posttrained[3] / "posttrain/snapshots/teacher_3.safetensors")["meta"]
    assert meta["step"] == 7 and "seconds" not in meta["retrieval"]


def test_the_first_finetuned_teachers_of_a_longer_run_are_a_shorter_runs(posttrained):
    """What a row M < 6 reads: teachers 1 and 2 finetuned together with a third are the teachers a 2-teacher run
    finetunes (each on its own loss, clipped on its own, from the shared data order), as the snapshots are."""
    def sums(out, folder, stem):
        return [read_snapshot(f)["checksum"] for f in sorted((out / folder).glob(f"{stem}_*.safetensors"))]

    three, two = posttrained[3], posttrained[2]
    assert sums(three, "posttrain/snapshots", "teacher")[:2] == sums(two, "posttrain/snapshots", "teacher")
    mine = sums(three / "ft", "finetune_teachers/teachers", "teacher")
    assert len(mine) == 3 and mine[:2] == sums(two / "ft", "finetune_teachers/teachers", "teacher")


def test_finetuning_the_first_m_of_a_longer_runs_snapshots_finetunes_a_shorter_runs_teachers(posttrained, tmp_path,
                                                                                            cache_dir, synthetic_small):
    """distill.teachers=M in stage=finetune_teachers: the first M snapshots, finetuned as an M-snapshot run's are
    (the teacher_count's one-teacher pass, whose wall time its stats record as the pipeline's step would)."""
    three, two = posttrained[3], posttrained[2]
    assert train(args(tmp_path, cache_dir, synthetic_small, "stage=finetune_teachers", "posttrain.teachers=3",
                      "distill.teachers=2", f"distill.from_dir={three}", f"distill.bank_dir={tmp_path / 'banks'}")) == 0
    files = sorted((tmp_path / "finetune_teachers/teachers").glob("*.safetensors"))
    assert [f.stem for f in files] == ["teacher_1", "teacher_2"]
    theirs = sorted((two / "ft" / "finetune_teachers/teachers").glob("teacher_*.safetensors"))
    assert [read_snapshot(f)["checksum"] for f in files] == [read_snapshot(f)["checksum"] for f in theirs]
    stats = read(tmp_path / "finetune_teachers/stats.json")
    assert stats["teachers"] == 2 and stats["setup_seconds"] + stats["wall_seconds"] < stats["stage_seconds"]


# the fabricated runs: AUC rises by 3 points per teacher up to 4, then by 0.2, and by 0.5 points per seed
def fake_auc(seed: int, m: int) -> float:
    return 0.60 + 0.03 * min(m, 4) + 0.002 * max(m - 4, 0) + 0.005 * seed


SNAPSHOT_SECONDS = [40.0, 50.0, 60.0, 70.0, 80.0, 90.0]  # post-training's elapsed seconds at snapshot k


ONE_TEACHER = 160.0  # the one-teacher finetuning pass (s); the 6-teacher run's takes 600: b = 88, a = 72
STAGE1_BANK = 30.0  # the seconds the full run's Stage I spends building its 6 teachers' bank
FULL_RUN_STAGE2_EXTRA = 0.0  # the seconds the full run's Stage II takes beyond a linked row's (its process's state)


class FakeRuns:
    """benchmarks.quality's run_job (and common's, for the one-teacher pass), fabricated: writes what the benchmark
    reads of a pipeline (a run folder, the teachers' done.json of a run that trains them) and records every job."""

    def __init__(self, snapshot_seconds: bool = True):
        self.jobs = []
        self.snapshot_seconds = snapshot_seconds

    def patch(self, monkeypatch):
        monkeypatch.setattr(quality, "run_job", self)
        monkeypatch.setattr(common, "run_job", self)
        return self

    def __call__(self, name, overrides, out_root, **kw):
        words = dict(o.split("=", 1) for o in overrides)
        seed, m, linked = int(words["train.seed"]), int(words["distill.teachers"]), "pipeline.teachers_from" in words
        run = Path(out_root) / name
        run.mkdir(parents=True)
        if words["stage"] == "finetune_teachers":  # the one-teacher pass reads the seed's full run's snapshots
            assert kw["stage"] == "finetune_teachers"
            assert (Path(words["distill.from_dir"]) / "quality_run.json").exists()
            self.jobs.append((name, overrides))
            return {"name": name, "command": "-m speedyrec.train " + " ".join(overrides), "process_seconds": 170.0,
                    "stats": {"stage_seconds": ONE_TEACHER}, "metrics": {"teacher_1": {"auc": 0.7 + 0.001 * seed}}}
        seconds = {"distill_posttrain": 100.0 + m + (0 if linked else STAGE1_BANK),
                   "distill_finetune": 200.0 + m + (0 if linked else FULL_RUN_STAGE2_EXTRA)}
        # Stage I's teacher bank: built by the seed's full run, read (in no time) by the rows linking it
        (run / "distill_posttrain").mkdir()
        (run / "distill_posttrain" / "done.json").write_text(json.dumps(
            {"result": {"stats": {"bank_seconds": 0.0 if linked else STAGE1_BANK}}}))
        if not linked:
            seconds = {"posttrain": 90.0, **seconds, "finetune_teachers": 600.0}
            (run / "finetune_teachers").mkdir()
            (run / "finetune_teachers" / "done.json").write_text("{}")
        most = int(words["posttrain.teachers"])
        snaps = [{"name": f"teacher_{k + 1}", "step": 10 + 5 * k} for k in range(most)]
        if self.snapshot_seconds:
            for s, t in zip(snaps, SNAPSHOT_SECONDS):
                s["seconds"] = t
        student = {k: fake_auc(seed, m) - (0.1 if k != "auc" else 0) for k in METRICS}
        teachers = {} if linked else {"teacher_1": {"auc": 0.7 + 0.001 * seed + 0.0002, "layers": 6}}
        self.jobs.append((name, overrides))
        return {"command": "-m speedyrec.train " + " ".join([f"out_dir={run}", "train.log_every=0", *overrides]),
                "process_seconds": sum(seconds.values()) + 5,
                "metrics": {"models": {**teachers, "student": {**student, "layers": 2}}, "seconds": seconds,
                            "posttrain": snaps,
                            "linked": ["posttrain", "finetune_teachers"] if linked else []}}


@pytest.fixture
def results(tmp_path, monkeypatch):
    """benchmarks/results in a temporary folder; this test's record of reused jobs."""
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "_REUSED", [])
    return tmp_path / "results"


def test_every_run_reads_the_first_m_teachers_of_its_seeds_six_teacher_run(tmp_path, results, monkeypatch):
    runs = FakeRuns().patch(monkeypatch)
    out = tmp_path / "runs"
    payload = tc.main(["--seeds", "0,1", "--out", str(out)])
    # per seed: the 6-teacher run first (its teachers are linked), then M = 1..5 linking it, then the one-teacher
    # pass reading its snapshots
    assert [n for n, _ in runs.jobs] == [name for s in (0, 1) for name in (
        *[f"teacher_count_m{m}_seed_{s}" for m in (6, 1, 2, 3, 4, 5)], f"teacher_count_pass_m1_seed_{s}")]
    for name, overrides in runs.jobs:
        m, seed = int(name.split("_m")[1].split("_")[0]), int(name.rsplit("_", 1)[1])
        six = out / f"teacher_count_m6_seed_{seed}"
        if "_pass_" in name:
            assert overrides == ["stage=finetune_teachers", f"train.seed={seed}", "posttrain.teachers=6",
                                 "distill.teachers=1", f"distill.from_dir={six}"]
            continue
        assert overrides[:4] == ["stage=pipeline", f"train.seed={seed}", "posttrain.teachers=6", f"distill.teachers={m}"]
        link = [o for o in overrides if o.startswith("pipeline.teachers_from=")]
        assert link == ([] if m == 6 else [f"pipeline.teachers_from={six}"])
        assert not any(o.startswith("distill.student_layers") for o in overrides)  # the pipeline's 2-layer student
    saved = json.loads((results / "teacher_count.json").read_text())
    assert {"rows", "table", "paired", "seconds", "machine", "quick", "total", "runs", "reference"} <= set(saved)
    assert saved["quick"] is False and saved["reference"] == 4 and list(saved["rows"]) == [str(m) for m in range(1, 7)]
    assert saved["total"] == pytest.approx(sum(r["process_seconds"] for r in saved["runs"].values()))
    assert len(saved["runs"]) == 14 and saved["seconds"]["teacher_count_m3_seed_1"] == {"distill_posttrain": 103.0,
                                                                                         "distill_finetune": 203.0}
    assert saved["seconds"]["teacher_count_pass_m1_seed_1"] == {"finetune_teachers": ONE_TEACHER}
    row = saved["rows"]["3"]["seeds"]["1"]
    assert row["auc"] == pytest.approx(fake_auc(1, 3)) and row["run"] == "teacher_count_m3_seed_1"
    # the cost of M = 3: snapshot 3's seconds, its own Stage I and II, and the finetuning pass on the line through
    # its measured cost with 1 teacher (160 s) and with 6 (600 s): 160 + 2 x 88
    assert row["seconds"] == pytest.approx({"posttrain": 60.0, "stage1": 103.0, "teachers": 336.0, "stage2": 203.0,
                                            "student": 539.0, "all": 702.0})
    assert row["posttrain_prorated"] is False
    assert saved["rows"]["6"]["seeds"]["0"]["seconds"]["teachers"] == pytest.approx(600.0)  # measured: all 6
    assert saved["rows"]["1"]["seeds"]["0"]["seconds"]["teachers"] == pytest.approx(ONE_TEACHER)  # measured: one
    cost = dict(saved["teacher_pass"]["1"])
    assert cost.pop("teacher_1_auc") == pytest.approx({"alone": 0.701, "in_pass": 0.7012})
    assert cost == pytest.approx({"one": 160.0, "most": 600.0, "per_teacher": 88.0, "shared": 72.0,
                                  "stage1_bank": STAGE1_BANK})
    # Stage I is its training alone in every row: the full run's bank (which the others read) is set apart
    assert saved["rows"]["6"]["seeds"]["0"]["seconds"]["stage1"] == pytest.approx(106.0)
    assert saved["runs"]["teacher_count_m6_seed_0"]["stage1_bank_seconds"] == STAGE1_BANK
    # means over seeds, and differences to M = 4 paired by seed: the seeds' spread cancels
    assert saved["table"]["2"]["auc"]["mean"] == pytest.approx(fake_auc(0.5, 2))
    assert saved["table"]["2"]["auc"]["std"] == pytest.approx(0.005 / 2 ** 0.5)
    assert "4" not in saved["paired"] and saved["paired"]["1"]["seeds"] == ["0", "1"]
    assert saved["paired"]["1"]["auc"]["mean"] == pytest.approx(-0.09)
    assert saved["paired"]["1"]["auc"]["std"] == pytest.approx(0, abs=1e-12)
    assert saved["paired"]["6"]["mrr"]["mean"] == pytest.approx(0.004)
    assert saved["paired"]["6"]["seconds"]["student"]["mean"] == pytest.approx(2 * 88.0 + 2)
    md = (results / "teacher_count.md").read_text()
    assert "## Verdict" in md and "**measured** with 1 teacher" in md and "estimated" not in md
    # seed 1's pass, a and b, teacher 1's AUC, Stage I's bank
    assert "| 1 | 2.7 | 10.0 | 1.2 | 1.5 | 70.10 | 70.12 | 0.5 |" in md and "a < 0" not in md
    assert "Stage II of M = 6 took" not in md
    assert "M = 1 -> 4: the student's AUC +9.00 ± 0.00 points over 2 seed(s), +3.00 per added teacher: a gain, as " \
           "in the paper (clear: beyond twice its spread)." in md
    assert "M = 4 -> 6: the student's AUC +0.40 ± 0.00 points over 2 seed(s), +0.20 per added teacher: a gain " \
           "(clear: beyond twice its spread), per teacher at most half the one up to M = 4: marginal, as the paper " \
           "says." in md
    assert "The highest mean AUC is at M = 6" in md and "provisional" not in md
    assert "6.0 min at M = 1, 10.5 min at M = 4, 13.4 min at M = 6: +1.5 min per added teacher" in md
    if importlib.util.find_spec("matplotlib") is not None:  # the [bench] extra: CI installs [test] only
        assert (results / "teacher_count.png").is_file()
    assert payload["table"] == json.loads(json.dumps(saved["table"]))


def test_recorded_runs_are_reused_and_a_missing_row_runs_its_seeds_six_teacher_run_again(tmp_path, results,
                                                                                         monkeypatch):
    FakeRuns().patch(monkeypatch)
    tc.main(["--seeds", "0", "--out", str(tmp_path / "first")])
    saved = json.loads((results / "teacher_count.json").read_text())

    def refuse(*a, **k):
        raise AssertionError("a recorded run was run again")
    monkeypatch.setattr(quality, "run_job", refuse)
    monkeypatch.setattr(common, "run_job", refuse)
    again = tc.main(["--seeds", "0", "--out", str(tmp_path / "second")])  # another session: no run folders
    assert again["rows"] == saved["rows"] and not (tmp_path / "second" / "teacher_count_m6_seed_0").exists()
    assert again["teacher_pass"] == saved["teacher_pass"]  # the pass recorded in another --out: the same job

    # a row the record lacks links teachers, which the record has no files of: the 6-teacher run runs again first
    del saved["runs"]["teacher_count_m2_seed_0"]
    (results / "teacher_count.json").write_text(json.dumps(saved))
    runs = FakeRuns().patch(monkeypatch)
    third = tc.main(["--seeds", "0", "--out", str(tmp_path / "third")])
    assert [n for n, _ in runs.jobs] == ["teacher_count_m6_seed_0", "teacher_count_m2_seed_0"]
    assert f"pipeline.teachers_from={tmp_path / 'third' / 'teacher_count_m6_seed_0'}" in runs.jobs[1][1]
    assert list(third["rows"]) == [str(m) for m in range(1, 7)]

    # the pass the record lacks reads the 6-teacher run's snapshots: that run runs again first
    saved = json.loads((results / "teacher_count.json").read_text())
    del saved["runs"]["teacher_count_pass_m1_seed_0"]
    (results / "teacher_count.json").write_text(json.dumps(saved))
    runs = FakeRuns().patch(monkeypatch)
    tc.main(["--seeds", "0", "--out", str(tmp_path / "fifth")])
    assert [n for n, _ in runs.jobs] == ["teacher_count_m6_seed_0", "teacher_count_pass_m1_seed_0"]

    # --fresh runs every row again
    runs = FakeRuns().patch(monkeypatch)
    tc.main(["--seeds", "0", "--out", str(tmp_path / "fourth"), "--fresh"])
    assert len(runs.jobs) == 7


def test_a_pass_growing_faster_than_its_teachers_and_a_slow_full_run_are_said_and_no_bank_time_is_refused(
        tmp_path, results, monkeypatch):
    """Six teachers taking more than six times one (here 600 s against 90 s) put the line's a below zero: the md says
    the rows between read a chord. The full run's Stage II, a minute slower than the rows', is named. A kept run
    whose record and folder lack Stage I's bank seconds cannot be costed."""
    monkeypatch.setattr(sys.modules[__name__], "ONE_TEACHER", 90.0)
    monkeypatch.setattr(sys.modules[__name__], "FULL_RUN_STAGE2_EXTRA", 60.0)
    FakeRuns().patch(monkeypatch)
    out = tmp_path / "runs"
    payload = tc.main(["--seeds", "0", "--out", str(out)])
    assert payload["teacher_pass"]["0"]["shared"] == pytest.approx(90.0 - 102.0)
    md = (results / "teacher_count.md").read_text()
    assert "Seed(s) 0: a < 0, i.e. 6 teachers took more than 6 times the pass of one (6.7x)" in md
    # the full run's Stage II, slower for the same steps, is said to be its process's, not its sixth teacher's
    assert "Stage II of M = 6 took 4.43 min against 3.38 (the mean of the other rows, which span 3.35 to 3.42)" \
        in md
    (out / "teacher_count_m3_seed_0" / "distill_posttrain" / "done.json").unlink()
    (results / "teacher_count.json").unlink()
    with pytest.raises(SystemExit, match="teacher_count_m3_seed_0: its record has no stage1_bank_seconds"):
        tc.main(["--seeds", "0", "--out", str(out), "--kept-only"])


def test_kept_only_tabulates_what_exists_and_runs_nothing(tmp_path, results, monkeypatch, capsys):
    """A seed whose 6-teacher run is neither kept nor recorded has quality rows but no cost; rows not run are named
    and left out."""
    FakeRuns().patch(monkeypatch)
    out = tmp_path / "runs"
    tc.main(["--seeds", "0", "--out", str(out)])
    (results / "teacher_count.json").unlink()
    for name in ("teacher_count_m6_seed_0", "teacher_count_m5_seed_0"):
        (out / name / "quality_run.json").unlink()

    def refuse(*a, **k):
        raise AssertionError("--kept-only ran a job")
    monkeypatch.setattr(quality, "run_job", refuse)
    monkeypatch.setattr(common, "run_job", refuse)
    payload = tc.main(["--seeds", "0", "--out", str(out), "--kept-only"])
    assert list(payload["rows"]) == ["1", "2", "3", "4"]
    assert payload["table"]["1"]["seconds"] is None and payload["rows"]["1"]["seeds"]["0"]["seconds"] is None
    assert payload["paired"]["1"]["auc"]["mean"] == pytest.approx(-0.09)
    said = capsys.readouterr().out
    assert "teacher_count_m5_seed_0: not run yet (--kept-only)" in said
    assert "teacher_count_m6_seed_0: not run yet (--kept-only)" in said
    with pytest.raises(SystemExit, match="no run of seeds 7"):
        tc.main(["--seeds", "7", "--out", str(out), "--kept-only"])


def test_quick_runs_three_teachers_on_quality_tiny_settings_and_old_runs_prorate_post_training(tmp_path, results,
                                                                                              monkeypatch):
    runs = FakeRuns(snapshot_seconds=False).patch(monkeypatch)  # runs made before snapshots recorded their seconds
    payload = tc.main(["--quick", "--out", str(tmp_path / "runs")])
    assert (results / "teacher_count_quick.json").is_file() and payload["reference"] == 3
    assert [n for n, _ in runs.jobs] == ["teacher_count_m3_seed_0", "teacher_count_m1_seed_0",
                                         "teacher_count_m2_seed_0", "teacher_count_pass_m1_seed_0"]
    for _, overrides in runs.jobs:
        assert [o for o in overrides if o.startswith("posttrain.teachers=")] == ["posttrain.teachers=3"]
        assert set(quality.QUICK) - {"posttrain.teachers=2"} <= set(overrides)
    row = payload["rows"]["2"]["seeds"]["0"]
    # snapshot 2 of 3 at step 15 of 20: 3/4 of the 90 s post-training
    assert row["posttrain_prorated"] is True and row["seconds"]["posttrain"] == pytest.approx(67.5)
    assert row["seconds"]["teachers"] == pytest.approx(380.0)  # midway between 160 s with 1 teacher and 600 with 3
    md = (results / "teacher_count_quick.md").read_text()
    assert "prorated by its steps" in md and "provisional" in md and "M = 1 -> 3" in md


def test_other_settings_make_another_table(tmp_path, results, monkeypatch):
    with pytest.raises(SystemExit):
        tc.main(["--set", "data.format=mind"])
    runs = FakeRuns().patch(monkeypatch)
    tc.main(["--quick", "--out", str(tmp_path / "runs"), "--set", "data.dir=/x", "--name", "teacher_count_x"])
    assert all("data.dir=/x" in o for _, o in runs.jobs)
    assert (results / "teacher_count_x.json").is_file() and not (results / "teacher_count_quick.json").exists()
    assert "these settings: `data.dir=/x`" in (results / "teacher_count_x.md").read_text()


def test_the_verdict_says_when_the_numbers_disagree_with_the_paper():
    def entry(mean, std, seeds=("0", "1", "2")):
        return {"auc": {"mean": mean, "std": std}, "seconds": None, "seeds": list(seeds)}

    table = {str(m): entry(0.7, 0.01) for m in range(1, 7)}
    # no clear gain up to 4, then a clear gain per teacher larger than before
    paired = {"1": entry(-0.001, 0.002), "6": entry(0.02, 0.005)}
    lines = "\n".join(tc.verdict(table, paired, 4))
    assert "within the spread over seeds: no clear gain (the paper: a large one)" in lines
    assert "a gain (clear: beyond twice its spread), per teacher as large as up to M = 4 or larger: disagrees with " \
           "the paper" in lines
    paired = {"1": entry(-0.03, 0.005), "6": entry(-0.02, 0.005)}
    lines = "\n".join(tc.verdict(table, paired, 4))
    assert "a gain, as in the paper (clear: beyond twice its spread)" in lines
    assert "a loss (clear: beyond twice its spread): more teachers made the student worse" in lines
    # past its spread but not twice it: counted, not marked clear
    lines = "\n".join(tc.verdict(table, {"1": entry(-0.015, 0.01)}, 4))
    assert "+1.50 ± 1.00 points over 3 seed(s), +0.50 per added teacher: a gain, as in the paper." in lines
