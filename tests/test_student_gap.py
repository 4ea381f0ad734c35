"""benchmarks.student_gap's harness with fabricated jobs: what each hypothesis runs, the paired effects beside the
student's gap, the answer written from them, and seeds recorded in one session reused in the next."""
from __future__ import annotations

import json

import pytest

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")


@pytest.fixture
def gap(tmp_path, monkeypatch):
    """The benchmark with its results in tmp_path and every training job fabricated: a teacher job's AUC is
    ``teacher[row]``, a pipeline's student ``student[row]`` (+ 0.001 * seed); the calls are recorded."""
    import benchmarks.common as common
    import benchmarks.quality as quality
    import benchmarks.student_gap as student_gap

    results = tmp_path / "results"
    for module in (common, quality):
        monkeypatch.setattr(module, "RESULTS", results)
    calls = []
    teacher = {"teacher_top2": 0.700, "teacher_all_layers": 0.710, "teacher_two_epochs": 0.701}
    student = {"base": 0.720, "student_uniform": 0.712}

    def seed_of(overrides):
        return int(next(o for o in overrides if o.startswith("train.seed=")).split("=")[1])

    def teacher_job(name, overrides, out_root, stage="", timeout=0):
        calls.append((name, overrides, stage))
        (out_root / name).mkdir(parents=True)
        auc = teacher[name.split("_seed_")[0].removeprefix("gap_")] + 0.001 * seed_of(overrides)
        return {"name": name, "command": "x", "stats": {}, "process_seconds": 60.0,
                "metrics": {"teacher_1": {k: auc for k in METRICS}}}

    def pipeline_job(name, overrides, root, timeout):
        calls.append((name, overrides, "pipeline"))
        (root / name / "finetune_teachers").mkdir(parents=True)
        (root / name / "finetune_teachers" / "done.json").write_text("{}")
        s = 0.001 * seed_of(overrides)
        row = "base" if name.startswith("base_seed_") else name.split("_seed_")[0].removeprefix("gap_")
        models = {"student": student[row] + s, "ensemble": 0.705 + s, "teacher_1": 0.703 + s,
                  "teacher_2": 0.701 + s, "plain": 0.699 + s}
        return {"command": "python -m speedyrec.train " + " ".join(overrides), "process_seconds": 120.0,
                "metrics": {"models": {n: {k: v for k in METRICS} for n, v in models.items()}, "seconds": {}}}

    monkeypatch.setattr(common, "run_job", teacher_job)
    monkeypatch.setattr(quality, "run_job", pipeline_job)
    return student_gap, calls, results


def test_each_hypothesis_runs_its_one_change_and_the_answer_follows_the_numbers(gap, tmp_path):
    student_gap, calls, results = gap
    payload = student_gap.main(["--seeds", "0,1,2", "--out", str(tmp_path / "runs")])
    by_name = {name: (over, stage) for name, over, stage in calls}
    control, _ = by_name["gap_teacher_top2_seed_1"]
    assert by_name["gap_teacher_top2_seed_1"][1] == "finetune_teachers"
    for o in ("stage=finetune_teachers", "teachers.init=plm", "posttrain.teachers=1", "train.seed=1"):
        assert o in control
    # each treatment is the control plus exactly one setting
    assert set(by_name["gap_teacher_all_layers_seed_1"][0]) - set(control) == {"teachers.finetune_layers=6"}
    assert set(by_name["gap_teacher_two_epochs_seed_1"][0]) - set(control) == {"train.epochs=2"}
    uniform, _ = by_name["gap_student_uniform_seed_2"]
    assert "distill.weighting=uniform" in uniform and "stage=pipeline" in uniform
    assert f"pipeline.teachers_from={tmp_path / 'runs' / 'base_seed_2'}" in uniform  # the seed's own teachers
    assert "pipeline.newsbert=false" in by_name["base_seed_2"][0]
    assert sum(1 for name, _, _ in calls if name.startswith("base_seed_")) == 3  # one base run per seed
    order = [name for name, _, _ in calls]  # the row linking the base run's teachers first, while its folder is there
    assert order.index("base_seed_0") < order.index("gap_student_uniform_seed_0") < order.index("gap_teacher_top2_seed_0")
    written = json.loads((results / "student_gap.json").read_text())
    assert written["seeds"] == [0, 1, 2]

    e = payload["effects"]
    assert e["all layers trained"]["auc"]["mean"] == pytest.approx(0.010)
    assert e["the per-sample weighting"]["auc"]["mean"] == pytest.approx(0.008)
    assert e["the extra epochs"]["auc"]["mean"] == pytest.approx(0.001)
    assert payload["gaps"]["student - ensemble"]["auc"]["mean"] == pytest.approx(0.015)
    assert payload["gaps"]["student - teachers"]["auc"]["mean"] == pytest.approx(0.018)
    md = (results / "student_gap.md").read_text()
    assert "The gap: the student is +1.50 AUC points above Ensemble-Teacher (paired over 3 seed(s)" in md
    assert "all layers trained: `teacher_all_layers` - `teacher_top2` = +1.00 ± 0.00 AUC points over 3 seed(s) " \
           "(67% of the gap); clear" in md
    assert "Answer: all layers trained earns the most (+1.00 points); it is at least half the gap" in md
    saved = json.loads((results / "student_gap.json").read_text())
    assert saved["rows"]["teacher_all_layers"]["2"]["auc"] == pytest.approx(0.712)
    # quality.md states the answer from the results file
    import benchmarks.quality as quality

    assert any("Answer: all layers trained" in line for line in quality.student_gap_section())


def test_a_seed_recorded_in_an_earlier_session_is_reused_and_the_next_one_joins_it(gap, tmp_path):
    student_gap, calls, results = gap
    student_gap.main(["--seeds", "0", "--out", str(tmp_path / "first")])
    assert {name for name, _, _ in calls} == {"gap_teacher_top2_seed_0", "gap_teacher_all_layers_seed_0",
                                             "gap_teacher_two_epochs_seed_0", "gap_student_uniform_seed_0",
                                             "base_seed_0"}
    calls.clear()
    payload = student_gap.main(["--seeds", "1", "--out", str(tmp_path / "second")])  # the first folder is gone
    assert {name for name, _, _ in calls} == {"gap_teacher_top2_seed_1", "gap_teacher_all_layers_seed_1",
                                             "gap_teacher_two_epochs_seed_1", "gap_student_uniform_seed_1",
                                             "base_seed_1"}
    assert payload["seeds"] == [0, 1] and payload["effects"]["the extra epochs"]["auc"]["seeds"] == 2
    calls.clear()
    assert student_gap.main(["--kept-only", "--out", str(tmp_path / "third")])["seeds"] == [0, 1]
    assert calls == []


def test_no_clear_gain_says_no_single_change_explains_the_gap():
    import benchmarks.student_gap as student_gap

    def m(mean, std, seeds=3):
        return {k: {"mean": mean, "std": std, "seeds": seeds} for k in METRICS}

    lines = student_gap.verdict({"gaps": {"student - ensemble": m(0.007, 0.001)},
                                 "effects": {"all layers trained": m(0.002, 0.003),
                                             "the per-sample weighting": m(-0.001, 0.001),
                                             "the extra epochs": m(0.004, 0.004)}})
    assert lines[-1] == "- Answer: none of the three changes earns a clear gain: no single one explains the gap."
    assert "(29% of the gap); within its spread" in lines[1]
    weak = student_gap.verdict({"gaps": {"student - ensemble": m(0.009, 0.001)},
                                "effects": {"the extra epochs": m(0.0041, 0.0021)}})  # 1.95 spreads: past one only
    assert "(46% of the gap); beyond its spread, not twice it: a weak effect." in weak[1]
    assert weak[-1] == "- Answer: none of the three changes earns a clear gain: no single one explains the gap."
    partial = student_gap.verdict({"gaps": {"student - ensemble": m(0.010, 0.001)},
                                   "effects": {"the extra epochs": m(0.003, 0.0005)}})
    assert partial[-1].endswith("less than half the gap: it explains part of it, not all.")
    one_seed = student_gap.verdict({"gaps": {"student - ensemble": m(0.009, 0.0, 1)},
                                    "effects": {"all layers trained": m(0.004, 0.0, 1),
                                                "the per-sample weighting": m(0.0003, 0.0, 1)}})
    assert one_seed[-1] == ("- Answer: not yet (one seed, no spread to judge by); the largest effect so far is all "
                            "layers trained (+0.40 points).")
