"""Tiny-NewsRec's Table 4 on our data: other multi-teacher methods against Tiny-NewsRec, over seeds.

``python -m benchmarks.kd_methods [--quick] [--seeds 0,1,2] [--out DIR] [--kept-only] [--fresh]``

Every row of a seed uses that seed's M teachers and data order and a 2-layer student. The seed's base run is
``base_seed_S`` (``benchmarks.quality.seed_base_run``) in the same ``--out`` (reused when kept there, else run
first): it gives Tiny-NewsRec's student and Ensemble-Teacher (the M post-trained teachers' mean score at test
time). The others:

- TinyBERT-MT: Stage I and Stage II with TinyBERT's losses (``distill.intermediate_weight=1``: embeddings', mapped
  layers' outputs and attention scores; the prediction layer's soft labels, ``distill.distill_weight``), each teacher
  weighted per sample as Tiny-NewsRec weighs them; no pooled-vector MSE and no hard-label loss, as TinyBERT
  (``distill.emb_weight=0``, ``distill.ce_weight_dp=0``, ``distill.ce_weight_ft=0``); the base run's teachers linked.
- NewsBERT-MT: ``stage=newsbert newsbert.teachers=M``: the M post-training snapshots trained jointly with the
  student, weighted per sample.
- MT-BERT: M teachers without post-training (``stage=finetune_teachers teachers.init=plm``, kept in ``--out``),
  then ``stage=newsbert newsbert.teacher_init=finetuned``: jointly trained with the student, weighted per sample.

A seed takes 2-3 hours here, a work session about 3, and ``--out`` does not outlive a session: every job is recorded
(``runs``: its command, overrides, metrics and seconds) in ``benchmarks/results/kd_methods.json``, and each finished
job at once in its ledger (``results/ledger/kd_methods.json``, until the results file holds it). A later invocation
reuses every job recorded with the same settings and tabulates every seed recorded so far beside those it runs
(``--seeds 1`` adds seed 1 to seed 0's rows). A job that must run and reads another job's folder (the base run's
teachers for TinyBERT-MT and NewsBERT-MT; MT-BERT's teachers for MT-BERT) runs that job again where its folder is
not kept in ``--out``; the jobs that finished are not run again. ``--kept-only`` runs nothing and names the rows
still missing; ``--fresh`` ignores the recorded jobs.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (clear_of_spread, committed_runs, ledger_add, machine, md_table, run_job_kept,
                               run_job_relocated, write_results)
from benchmarks.quality import (METRICS, PIPELINE_LAYERS, QUICK, base_name, base_run_record, experiment_parser,
                                recorded_seeds, same_settings, seed_base_run, seed_list, student_run)

NAMES = {"ndcg5": "nDCG@5", "ndcg10": "nDCG@10", "auc": "AUC", "mrr": "MRR"}
ROWS = (("ensemble", "Ensemble-Teacher"), ("tinybert_mt", "TinyBERT-MT"), ("newsbert_mt", "NewsBERT-MT"),
        ("mt_bert", "MT-BERT"), ("tiny_newsrec", "Tiny-NewsRec"))
PAPER_AUC = {"ensemble": 69.43, "tinybert_mt": 68.87, "newsbert_mt": 68.82, "mt_bert": 68.51, "tiny_newsrec": 69.58}
TINYBERT = ["distill.intermediate_weight=1", "distill.emb_weight=0", "distill.ce_weight_dp=0", "distill.ce_weight_ft=0"]
TEACHERS_FULL, TEACHERS_QUICK = 4, 2  # posttrain.teachers: the default, and QUICK's


def results_name(quick: bool) -> str:
    return "kd_methods_quick" if quick else "kd_methods"


def loop_seconds(run: dict, run_dir: Path) -> float | None:
    """The Stage I + Stage II training loops' seconds of a pipeline run (kept in ``run``, so a recorded run still
    says them once its folder is gone); None where the run's folder and record hold none."""
    stats = [run_dir / stage / "stats.json" for stage in ("distill_posttrain", "distill_finetune")]
    if all(f.exists() for f in stats):
        run["training_loops_seconds"] = sum(json.loads(f.read_text())["wall_seconds"] for f in stats)
    return run.get("training_loops_seconds")


def seed_rows(root: Path, seed: int, quick: bool, committed: dict, may_run: bool,
              ledger: str = "") -> tuple[dict, dict, dict]:
    """One seed's rows (dev metrics), the records of the jobs they come from (by run name) and each job's process
    seconds. A job is reused when kept in ``root`` or recorded in ``committed`` with the same settings, else run
    (``may_run``; its row is missing otherwise); each is put in ``ledger`` as soon as it is done. A job that must
    run reads its inputs from ``root``: the base run's teachers, MT-BERT's teachers, run again when not kept there."""
    m = TEACHERS_QUICK if quick else TEACHERS_FULL
    common = [f"train.seed={seed}", *(QUICK if quick else [])]
    base, tiny = base_name(seed), f"seed_{seed}_tinybert_mt"
    mt_teachers = f"seed_{seed}_mt_bert_teachers"
    mt_teachers_over = ["stage=finetune_teachers", "teachers.init=plm", *common]
    runs = {}

    def done(name: str, run: dict | None) -> dict | None:
        if run is not None:
            runs[name] = run
            if ledger:
                ledger_add(ledger, name, run)
        return run

    def base_folder(reader: str) -> None:
        """The base run's folder in ``root``, whose teachers ``reader`` (about to run) links."""
        if (root / base / "quality_run.json").exists():
            return
        if base in committed:
            print(f"{reader} must run and reads {base}'s teachers, whose folder is not in {root} (only its record "
                  f"is): running {base} again", flush=True)
        done(base, seed_base_run(root, seed, quick)[1])

    def mt_teachers_folder() -> None:
        if not (root / mt_teachers / "job.json").exists():
            print(f"MT-BERT must run and reads {mt_teachers}'s teachers, not kept in {root}: running them again",
                  flush=True)
            done(mt_teachers, run_job_kept(mt_teachers, mt_teachers_over, root, stage="finetune_teachers",
                                           timeout=6 * 3600))

    # TinyBERT-MT: student_run's own test of a finished run (kept, or recorded with these settings)
    tiny_over = ["stage=pipeline", f"train.seed={seed}", *TINYBERT, *(QUICK if quick else [])]
    if may_run and not (root / tiny / "quality_run.json").exists() and not (
            tiny in committed and same_settings(committed[tiny], tiny_over)):
        base_folder("TinyBERT-MT")
    done(tiny, student_run(root, tiny, seed, quick, TINYBERT, committed.get(tiny), may_run=may_run))
    jobs = (("newsbert_mt", ["stage=newsbert", f"newsbert.teachers={m}", f"distill.from_dir={root / base}"],
             lambda: base_folder("NewsBERT-MT")),
            ("mt_bert_teachers", mt_teachers_over[:2], None),
            ("mt_bert", ["stage=newsbert", f"newsbert.teachers={m}", "newsbert.teacher_init=finetuned",
                         f"distill.from_dir={root / mt_teachers}"], mt_teachers_folder))
    for job, over, before_run in jobs:
        name, overrides = f"seed_{seed}_{job}", [*over, *common]
        done(name, run_job_relocated(name, overrides, root, committed.get(name), may_run=may_run,
                                     stage=over[0].split("=")[1], before_run=before_run, timeout=6 * 3600))
    # the base run's rows: from the run the jobs above read where it is in root, else from its record
    recorded = base_run_record(root, seed, quick, committed, may_run)
    if recorded is not None:
        loop_seconds(recorded, root / base)
        done(base, recorded)
    if tiny in runs:
        loop_seconds(runs[tiny], root / tiny)
        done(tiny, runs[tiny])
    return seed_table(seed, runs)


def seed_table(seed: int, runs: dict) -> tuple[dict, dict, dict]:
    """(rows that ``runs`` holds: row -> metrics, the seed's runs, job label -> seconds) of one seed."""
    base, tiny = runs.get(base_name(seed)), runs.get(f"seed_{seed}_tinybert_mt")
    rows, seconds = {}, {}
    if base is not None:
        models = base["summary"]["models"]
        rows.update(ensemble=models["ensemble"], tiny_newsrec=models["student"])
        seconds[f"base pipeline ({base_name(seed)})"] = base["process_seconds"]
    if tiny is not None:
        rows["tinybert_mt"] = tiny["summary"]["models"]["student"]
        seconds["TinyBERT-MT (process)"] = tiny["process_seconds"]
    # what the intermediate losses cost: the M teachers' PLMs run online for every news the student encodes (the
    # training loops' time: the stages' wall time also holds the banks Tiny-NewsRec's base run built first)
    for label, run in (("Tiny-NewsRec", base), ("TinyBERT-MT", tiny)):
        if run is not None and "training_loops_seconds" in run:
            seconds[f"{label}: Stage I + Stage II training loops"] = run["training_loops_seconds"]
    for job, label in (("newsbert_mt", "NewsBERT-MT"), ("mt_bert_teachers", "MT-BERT's teachers"),
                       ("mt_bert", "MT-BERT (joint)")):
        run = runs.get(f"seed_{seed}_{job}")
        if run is not None:
            seconds[label] = run["process_seconds"]
            if job != "mt_bert_teachers":
                rows[job] = run["metrics"]["student"]
    return {k: {m: v[m] for m in METRICS} for k, v in rows.items()}, runs, seconds


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: dict) -> tuple[dict, dict]:
    """(table: row -> metric -> mean, std; paired: row - Tiny-NewsRec, by seed -> metric -> mean, std)."""
    seeds = sorted(per_seed)
    table = {name: {m: dict(zip(("mean", "std"), mean_std([per_seed[s][name][m] for s in seeds]))) for m in METRICS}
             for name, _ in ROWS}
    paired = {name: {m: dict(zip(("mean", "std"), mean_std([per_seed[s][name][m] - per_seed[s]["tiny_newsrec"][m]
                                                            for s in seeds]))) for m in METRICS}
              for name, _ in ROWS if name != "tiny_newsrec"}
    return table, paired


def verdict(table: dict, paired: dict, seeds: int, quick: bool, per_seed: dict | None = None) -> list[str]:
    """What agrees with the paper's Table 4 and what does not, from the numbers. The worst student and the best row
    are named by their means; with ``per_seed`` (seed -> row -> metrics) over several seeds, one that its runner-up
    is not told apart from (their paired AUC difference within its spread over seeds) is said to be so, and the
    verdict is undecided, not agrees or disagrees, when the paper's row is either of the two or is not told apart
    from the one found."""
    auc = {name: 100 * table[name]["auc"]["mean"] for name, _ in ROWS}
    label = dict(ROWS)
    out = []
    if quick:
        out.append("- Quick settings: tiny random encoders trained a few steps, so these AUCs sit near chance (50) "
                   "and the comparisons below check the harness, not the paper.")
    for name, _ in ROWS[:-1]:
        d, sd = 100 * paired[name]["auc"]["mean"], 100 * paired[name]["auc"]["std"]
        paper = PAPER_AUC[name] - PAPER_AUC["tiny_newsrec"]
        clear = clear_of_spread(d, sd, seeds)
        agrees = d < 0
        out.append(f"- {label[name]}: {d:+.2f} AUC points against Tiny-NewsRec (paired by seed"
                   + (f", ± {sd:.2f}" if seeds > 1 else ", one seed") + f"); the paper: {paper:+.2f}. "
                   + ("Agrees: below Tiny-NewsRec" if agrees else "Disagrees: not below Tiny-NewsRec")
                   + ("" if clear else " (within the seeds' spread)" if seeds > 1 else " (one seed: no spread)") + ".")

    def pair_diff(first: str, second: str) -> tuple[float, float] | None:
        """first - second in AUC points, paired by seed (mean, std); None under 2 seeds."""
        if not per_seed or len(per_seed) < 2:
            return None
        return mean_std([100 * (per_seed[s][first]["auc"] - per_seed[s][second]["auc"]) for s in per_seed])

    def tie(first: str, second: str) -> str:
        """' (not told apart from second: ...)' when first - second, paired by seed, is within its spread."""
        if (p := pair_diff(first, second)) is None:
            return ""
        d, sd = p
        return (f" (not told apart from {label[second]}: paired {d:+.2f} ± {sd:.2f})" if abs(d) <= sd else
                f" (paired against {label[second]}: {d:+.2f} ± {sd:.2f})")

    def word(found: str, expected: str, runner_up: str) -> str:
        """Whether the row found where the paper has ``expected`` agrees; undecided when the seeds cannot order
        the two (their paired difference within its spread), or when the paper's row is found by its mean but its
        runner-up is not told apart from it."""
        if found == expected:
            if (p := pair_diff(found, runner_up)) is not None and abs(p[0]) <= p[1]:
                return "undecided: the paper's row by its mean, but the seeds do not order the two"
            return "agrees"
        p = pair_diff(found, expected)
        if p is None or abs(p[0]) > p[1]:
            return "disagrees"
        if expected == runner_up:  # tie() has just given the pair
            return "undecided: the seeds do not order the two"
        return f"undecided: the paper's {label[expected]} is not told apart from it (paired {-p[0]:+.2f} ± {p[1]:.2f})"

    students = sorted(("tinybert_mt", "newsbert_mt", "mt_bert"), key=auc.get)
    worst = students[0]
    out.append(f"- The paper's MT-BERT is the worst student; here the worst is {label[worst]} "
               f"({auc[worst]:.2f}){tie(worst, students[1])}: {word(worst, 'mt_bert', students[1])}.")
    ranked = sorted(auc, key=auc.get, reverse=True)
    best = ranked[0]
    out.append(f"- The paper's best row is Tiny-NewsRec; here it is {label[best]} ({auc[best]:.2f})"
               f"{tie(best, ranked[1])}: {word(best, 'tiny_newsrec', ranked[1])}.")
    return out


def report(per_seed: dict, seconds: dict, runs: dict, missing: dict, info: dict, quick: bool, command: str,
           total: float) -> dict:
    """The tables of the complete seeds (``per_seed``: seed -> row -> metrics), written with every job's record
    (``runs``, by run name), so a later invocation reuses them; ``missing``: seed -> rows not measured yet."""
    table, paired = summarise(per_seed)
    many = len(per_seed) > 1
    jobs = sum(r["process_seconds"] for r in runs.values())  # every job behind the tables, whenever it ran
    commits = sorted({r.get("commit") or "unknown" for r in runs.values()})
    labels = dict(ROWS)

    def cell(v):
        return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if many else f"{100 * v['mean']:.2f}"

    rows_json = {name: {str(s): per_seed[s][name] for s in sorted(per_seed)} for name, _ in ROWS}
    payload = {"machine": info, "quick": quick, "command": command, "seeds": sorted(per_seed), "rows": rows_json,
               "table": table, "paired": paired, "seconds": seconds, "jobs_seconds": jobs,
               "invocation_seconds": total, "student_layers": PIPELINE_LAYERS,
               "missing": {str(s): rows for s, rows in missing.items()},
               "verdict": verdict(table, paired, len(per_seed), quick, per_seed), "runs": runs}
    m = TEACHERS_QUICK if quick else TEACHERS_FULL
    md = ["# Table 4: other multi-teacher methods against Tiny-NewsRec\n",
          f"Tabulated at commit {info['commit']} on {info['device']} (torch {info['torch']}; load average before "
          f"{', '.join(f'{x:.1f}' for x in info.get('load_average_before', ()))}: the cores are shared, so times are "
          f"indicative) by `{command}`; the jobs ran at commit(s) {', '.join(commits)} (each job's record says its "
          f"own), over one or more sessions; {len(per_seed)} seed(s)"
          f"{' (quick settings: tiny random encoders)' if quick else ''}. "
          f"Total wall time {jobs / 60:.1f} min (every job's process, the base runs included, whenever it ran; "
          f"this invocation {total / 60:.1f} min, reusing the jobs kept in `--out` or recorded in the results file). "
          f"M = {m} teachers, a {PIPELINE_LAYERS}-layer student; every row of a seed uses that seed's teachers "
          "and data order (`train.seed`). Mean ± standard deviation over seeds, in points (x100).\n",
          "".join(f"Seed {s} is left out of the tables: {', '.join(labels[r] for r in rows)} not measured yet (run "
                  f"`--seeds {s}`).\n" for s, rows in sorted(missing.items())),
          md_table(["method", *[NAMES[k] for k in METRICS], "paper AUC (Feeds, 4 layers)"],
                   [[label, *[cell(table[name][k]) for k in METRICS], f"{PAPER_AUC[name]:.2f}"]
                    for name, label in ROWS]),
          "\nDifference to Tiny-NewsRec, paired by seed, in points:\n",
          md_table(["method", *[NAMES[k] for k in METRICS]],
                   [[label, *[f"{100 * paired[name][k]['mean']:+.2f}" + (f" ± {100 * paired[name][k]['std']:.2f}"
                                                                         if many else "") for k in METRICS]]
                    for name, label in ROWS if name != "tiny_newsrec"]),
          "\nVerdict against the paper's Table 4:\n", "\n".join(payload["verdict"]),
          "\n\nWhat each row trains:\n",
          "- Ensemble-Teacher: the M post-trained, finetuned teachers of the base run (`base_seed_S`), "
          "their mean score at test time.\n"
          "- TinyBERT-MT: Stage I and Stage II with `" + " ".join(TINYBERT) + "`: per news, the student's "
          "embeddings', layers' outputs and attention scores against teacher layer i * K's, and the soft labels, each "
          "teacher weighted per sample (alpha, beta), no pooled-vector MSE and no hard-label loss (TinyBERT's task "
          "distillation). The teacher bank holds news vectors only, so every news the student encodes runs the M "
          "teachers' PLMs as well: its cost is M teacher forwards per student encoding (wall times below).\n"
          f"- NewsBERT-MT: `stage=newsbert newsbert.teachers={m}`: the M post-training snapshots and the student "
          "trained jointly, sharing one pooling, projection and user encoder, the student's losses weighted per "
          "target by softmax(-CE), momentum from the mean of the M teachers' blocks.\n"
          "- MT-BERT: the paper's teachers are different PLMs; this machine is offline with one PLM, so M "
          "initialisations of it stand for them: teacher i is the PLM without post-training whose pooling, "
          "projection and user encoder are drawn with seed `train.seed + i`, its top `teachers.finetune_layers` "
          "layers finetuned from there (`stage=finetune_teachers teachers.init=plm`, kept in `--out`); then "
          f"`stage=newsbert newsbert.teachers={m} newsbert.teacher_init=finetuned` trains them jointly with the "
          "student, all sharing the first teacher's pooling, projection and user encoder (MT-BERT's co-finetuned "
          "teachers share theirs), weighted per sample. Its student thus starts beside a finetuned head (the first "
          "teacher's pooling, projection and user encoder), which the other students learn in their own stages: in a "
          "short run that head start weighs.\n"
          "- Tiny-NewsRec: the base run's student.\n",
          "\nWall time of each job (s; a kept or recorded job's is from when it ran):\n",
          md_table(["seed", "job", "s"], [[s, job, f"{v:.0f}"] for s, by in seconds.items() for job, v in by.items()])]
    write_results(results_name(quick), payload, "\n".join(md),
                  plot=lambda path: _plot(path, table, quick))
    print("\n".join(md))
    return payload


def _plot(path, table: dict, quick: bool) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    means = [100 * table[n]["auc"]["mean"] for n, _ in ROWS]
    stds = [100 * table[n]["auc"]["std"] for n, _ in ROWS]
    ax.bar(range(len(ROWS)), means, yerr=stds, capsize=4,
           color=["#4c72b0", "#8172b2", "#55a868", "#8c8c8c", "#dd8452"])
    ax.set_xticks(range(len(ROWS)))
    ax.set_xticklabels([label for _, label in ROWS], fontsize=8)
    ax.set_ylabel("dev AUC (x100)")
    ax.set_ylim(min(m - s for m, s in zip(means, stds)) - 2, max(m + s for m, s in zip(means, stds)) + 1)
    ax.set_title("Table 4: multi-teacher methods" + (" (quick)" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = experiment_parser("benchmarks.kd_methods", __doc__, "tiny random encoders, 2 teachers, a few steps per stage")
    a = p.parse_args(argv)
    seeds = seed_list(a.seeds, a.quick)
    info = machine()
    command = "python -m benchmarks.kd_methods " + " ".join(argv if argv is not None else sys.argv[1:])
    committed = committed_runs(results_name(a.quick), a.fresh)
    ledger = "" if a.quick else results_name(a.quick)  # as speedup's: a --quick run takes minutes
    t0 = time.perf_counter()
    payload = None
    per_seed, seconds, runs, missing = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        # the seeds recorded by earlier invocations are tabulated too, from their records (nothing of theirs runs)
        for seed in sorted(set(seeds) | set(recorded_seeds(committed))):
            rows, seed_runs, seconds[seed] = seed_rows(root, seed, a.quick, committed,
                                                       may_run=seed in seeds and not a.kept_only, ledger=ledger)
            runs.update(seed_runs)
            if len(rows) == len(ROWS):
                per_seed[seed] = rows
            else:
                missing[seed] = [name for name, _ in ROWS if name not in rows]
            if per_seed:  # rewritten after every seed: an interrupted invocation keeps what it measured
                payload = report(per_seed, seconds, runs, missing, info, a.quick, command, time.perf_counter() - t0)
    if payload is None:
        raise SystemExit(f"benchmarks.kd_methods: no seed has all its rows kept in {root} or recorded; missing: "
                         + "; ".join(f"seed {s}: {', '.join(dict(ROWS)[r] for r in rows)}"
                                     for s, rows in sorted(missing.items())))
    return payload


if __name__ == "__main__":
    main()
