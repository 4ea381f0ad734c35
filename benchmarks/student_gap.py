"""Why Tiny-NewsRec's student beats its teachers here: one controlled run per hypothesis, over seeds.

``python -m benchmarks.student_gap [--quick] [--seeds 0,1,2] [--out DIR] [--kept-only] [--fresh]``

benchmarks/results/quality.md finds the 2-layer student above the mean score of its M post-trained teachers
(Ensemble-Teacher), by more than the paper's 4-layer student is. Three explanations, each tested by changing one
thing, paired by seed:

- **All layers trained.** A teacher finetunes its top ``teachers.finetune_layers`` = 2 of 6 layers; the student
  trains all of its layers. Control: the PLM finetuned as a teacher is (``stage=finetune_teachers teachers.init=plm
  posttrain.teachers=1``: one teacher, no post-training, so the run costs one teacher and no snapshot); treatment:
  the same with ``teachers.finetune_layers=6``.
- **The per-sample weighting.** Both distillation stages weigh the M teachers per sample by softmax(-CE).
  Treatment: the seed's student again with ``distill.weighting=uniform`` (1/M each), linking the seed's teachers;
  against the seed's own student.
- **The extra epochs.** The student learns from teachers that already trained on the clicks, then trains on them
  again: twice the clicks, in a sense. Treatment: the control teacher finetuned for ``train.epochs=2``.

The teacher runs change a plain teacher, not a post-trained one: they measure what each change earns a teacher of
this recipe, which is compared with the student's gap. The seed's base run (``base_seed_S``, shared with
benchmarks.ablation, kd_methods and efficiency in the same ``--out``) gives the student, the ensemble and the
teachers. Cost here (2 cores, seed 1 with the cores to itself): the four rows 24 min per seed beside the base run
(32 min more when it is not kept in ``--out``).
Runs are recorded in benchmarks/results/student_gap.json (and its ledger as they finish), so the seeds may be
measured in several sessions; the answer is written into quality.md too (``benchmarks.quality --report``, ``student_gap_section``).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks.common import clear_of_spread, committed_runs, machine, md_table, run_job_kept, write_results
from benchmarks.quality import (METRICS, QUICK, base_name, base_run_record, experiment_parser, recorded_seeds,
                                seed_list, student_run)

TEACHER = ["stage=finetune_teachers", "teachers.init=plm", "posttrain.teachers=1"]
# row -> (what it is, its switch); the teacher rows run TEACHER with the switch, the student row links the seed's
# teachers (benchmarks.quality.student_run)
TEACHER_ROWS = {"teacher_top2": ("a teacher as the recipe trains it: the PLM, its top 2 layers finetuned, 1 epoch", []),
                "teacher_all_layers": ("the same teacher, all 6 layers finetuned", ["teachers.finetune_layers=6"]),
                "teacher_two_epochs": ("the same teacher, finetuned for 2 epochs", ["train.epochs=2"])}
STUDENT_ROWS = {"student_uniform": ("the student, the teachers weighted 1/M in both stages",
                                   ["distill.weighting=uniform"])}
BASE_ROWS = {"student": "Tiny-NewsRec's student (the base run)",
             "ensemble": "Ensemble-Teacher: the M teachers' mean score (the base run)",
             "teachers": "the M post-trained teachers, each (mean of M; the base run)",
             "plain": "the plain teacher of the base run (PLM, top 2 layers; trained beside the M)"}
# hypothesis -> (treatment row, control row)
HYPOTHESES = {"all layers trained": ("teacher_all_layers", "teacher_top2"),
              "the per-sample weighting": ("student", "student_uniform"),
              "the extra epochs": ("teacher_two_epochs", "teacher_top2")}


def results_name(quick: bool) -> str:
    return "student_gap_quick" if quick else "student_gap"


def run_name(row: str, seed: int) -> str:
    return f"gap_{row}_seed_{seed}"


def base_rows(summary: dict) -> dict:
    models = summary["models"]
    teachers = [m for name, m in models.items() if name.startswith("teacher_")]
    rows = {name: {k: models[name][k] for k in METRICS} for name in ("student", "ensemble", "plain") if name in models}
    rows["teachers"] = {k: statistics.mean(t[k] for t in teachers) for k in METRICS}
    return rows


def seed_rows(root: Path, seed: int, quick: bool, committed: dict, may_run: bool,
              progress=lambda rows, runs: None) -> tuple[dict, dict]:
    """One seed's metrics per row, and the run records they come from (by run name). The rows that link the seed's
    base run's teachers run first, while its folder is there (a later session would train it again); the teacher
    rows need nothing of it. ``progress(rows, runs)`` after every row: a session may end before the seed does."""
    rows, runs = {}, {}
    common = [f"train.seed={seed}", *(QUICK if quick else [])]
    for row, (_, switch) in STUDENT_ROWS.items():
        name = run_name(row, seed)
        run = student_run(root, name, seed, quick, switch, committed.get(name), may_run=may_run)
        if run is not None:
            runs[name] = run
            rows[row] = {k: run["summary"]["models"]["student"][k] for k in METRICS}
    name = base_name(seed)
    recorded = base_run_record(root, seed, quick, committed, may_run)
    if recorded is not None:
        runs[name] = recorded
        rows.update(base_rows(recorded["summary"]))
    progress(dict(rows), dict(runs))
    for row, (_, switch) in TEACHER_ROWS.items():
        name = run_name(row, seed)
        job = run_job_kept(name, [*common, *TEACHER, *switch], root, may_run=may_run, committed=committed.get(name),
                           ledger=results_name(quick), stage="finetune_teachers", timeout=6 * 3600)
        if job is not None:
            runs[name] = job
            rows[row] = {k: job["metrics"]["teacher_1"][k] for k in METRICS}
            progress(dict(rows), dict(runs))
    return rows, runs


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def paired(per_seed: dict, a: str, b: str) -> dict | None:
    """a - b per metric over the seeds that have both, mean and std; None when no seed has both."""
    seeds = [s for s, rows in per_seed.items() if a in rows and b in rows]
    if not seeds:
        return None
    return {k: mean_std([per_seed[s][a][k] - per_seed[s][b][k] for s in seeds]) for k in METRICS}


def summarize(per_seed: dict) -> dict:
    rows = [*BASE_ROWS, *TEACHER_ROWS, *STUDENT_ROWS]
    table = {r: {k: mean_std([m[r][k] for m in per_seed.values() if r in m]) for k in METRICS}
             for r in rows if any(r in m for m in per_seed.values())}
    gaps = {f"student - {b}": paired(per_seed, "student", b) for b in ("ensemble", "teachers")}
    effects = {h: paired(per_seed, a, b) for h, (a, b) in HYPOTHESES.items()}
    return {"table": table, "gaps": {k: v for k, v in gaps.items() if v},
            "effects": {k: v for k, v in effects.items() if v}}


def verdict(summary: dict) -> list[str]:
    """Each hypothesis's effect beside the gap it would explain, and the answer, from the numbers."""
    gap = summary["gaps"].get("student - ensemble")
    if gap is None:
        return ["- No seed has both the student and the ensemble yet: no gap to explain."]
    g = 100 * gap["auc"]["mean"]
    out = [f"- The gap: the student is {g:+.2f} AUC points above Ensemble-Teacher (paired over {gap['auc']['seeds']} "
           f"seed(s), ± {100 * gap['auc']['std']:.2f})."]
    clear = {}
    for h, e in summary["effects"].items():
        d, sd, n = 100 * e["auc"]["mean"], 100 * e["auc"]["std"], e["auc"]["seeds"]
        a, b = HYPOTHESES[h]
        is_clear = clear_of_spread(d, sd, n)
        share = f"{d / g:.0%} of the gap" if g > 0 else "no gap to share"
        out.append(f"- {h}: `{a}` - `{b}` = {d:+.2f} ± {sd:.2f} AUC points over {n} seed(s) ({share}); "
                   + ("clear (beyond twice its spread)" if is_clear else
                      "beyond its spread, not twice it: a weak effect" if n > 1 and abs(d) > sd else
                      "within its spread" if n > 1 else "one seed: no spread yet") + ".")
        if is_clear and d > 0:
            clear[h] = d
    if not clear and summary["effects"] and max(e["auc"]["seeds"] for e in summary["effects"].values()) < 2:
        h = max(summary["effects"], key=lambda k: summary["effects"][k]["auc"]["mean"])
        out.append(f"- Answer: not yet (one seed, no spread to judge by); the largest effect so far is {h} "
                   f"({100 * summary['effects'][h]['auc']['mean']:+.2f} points).")
    elif not clear:
        out.append("- Answer: none of the three changes earns a clear gain: no single one explains the gap.")
    else:
        best = max(clear, key=clear.get)
        enough = clear[best] >= g / 2
        out.append(f"- Answer: {best} earns the most ({clear[best]:+.2f} points); "
                   + ("it is at least half the gap, the likeliest explanation."
                      if enough else "less than half the gap: it explains part of it, not all."))
    return out


def report(per_seed: dict, runs: dict, info: dict, quick: bool) -> dict:
    summary = summarize(per_seed)
    labels = {**BASE_ROWS, **{r: v[0] for r, v in {**TEACHER_ROWS, **STUDENT_ROWS}.items()}}
    seconds = sum(r.get("process_seconds", 0.0) for r in runs.values())
    payload = {"machine": info, "quick": quick, "seeds": sorted(per_seed), "rows": {
        r: {str(s): m[r] for s, m in sorted(per_seed.items()) if r in m} for r in summary["table"]},
        **summary, "verdict": verdict(summary), "jobs_seconds": seconds, "runs": runs}

    def cell(v):
        return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if v["seeds"] > 1 else f"{100 * v['mean']:.2f}"

    md = ["# Why the student beats its teachers: one controlled run per hypothesis\n",
          f"Measured at commit {info['commit']} on {info['device']}, torch {info['torch']}"
          f"{' (quick settings: tiny random encoders, a few steps; a harness check)' if quick else ''}. "
          f"{len(per_seed)} seed(s); every job's wall time together {seconds / 60:.0f} min (the base runs included). "
          "Mean ± standard deviation over seeds, in points (x100). How each row is trained: "
          "`python -m benchmarks.student_gap`'s docstring.\n",
          md_table(["row", "what", "AUC", "MRR", "nDCG@5", "nDCG@10", "seeds"],
                   [[r, labels[r], *[cell(v[k]) for k in METRICS], v["auc"]["seeds"]]
                    for r, v in summary["table"].items()]),
          "\nPaired by seed, in points:\n",
          md_table(["comparison", "AUC", "MRR", "nDCG@5", "nDCG@10", "seeds"],
                   [[k, *[f"{100 * v[m]['mean']:+.2f} ± {100 * v[m]['std']:.2f}" for m in METRICS],
                     v["auc"]["seeds"]]
                    for k, v in [*summary["gaps"].items(),
                                 *[(f"{h}: {' - '.join(HYPOTHESES[h])}", e) for h, e in summary["effects"].items()]]]),
          "\nVerdict:\n", "\n".join(payload["verdict"]), ""]
    write_results(results_name(quick), payload, "\n".join(md), plot=lambda path: plot(path, summary))
    print("\n".join(md))
    return payload


def plot(path, summary: dict) -> None:
    import matplotlib.pyplot as plt

    items = [*[(k, v) for k, v in summary["gaps"].items()], *summary["effects"].items()]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    means = [100 * v["auc"]["mean"] for _, v in items]
    ax.barh(range(len(items)), means, xerr=[100 * v["auc"]["std"] for _, v in items], capsize=4,
            color=["#dd8452"] * len(summary["gaps"]) + ["#4c72b0"] * len(summary["effects"]))
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([k for k, _ in items], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("AUC points, paired by seed (mean ± std)")
    ax.set_title("The student's gap over its teachers, and what each change earns")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = experiment_parser("benchmarks.student_gap", __doc__)
    a = p.parse_args(argv)
    committed = committed_runs(results_name(a.quick), a.fresh)
    info = machine()
    per_seed, runs = {}, dict(committed)
    payload = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        for seed in sorted(set(seed_list(a.seeds, a.quick)) | set(recorded_seeds(committed))):
            run_now = not a.kept_only and seed in seed_list(a.seeds, a.quick)
            def progress(rows, seed_runs, seed=seed):  # rewritten after every row: an interruption keeps them
                if rows:
                    report({**per_seed, seed: rows}, {**runs, **seed_runs}, info, a.quick)

            rows, seed_runs = seed_rows(root, seed, a.quick, committed, may_run=run_now, progress=progress)
            if rows:
                per_seed[seed] = rows
                runs.update(seed_runs)
                payload = report(per_seed, runs, info, a.quick)
    if payload is None:
        raise SystemExit("benchmarks.student_gap: no run is recorded or kept yet")
    return payload


if __name__ == "__main__":
    main()
