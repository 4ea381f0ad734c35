"""Tiny-NewsRec's Table 4 on our data: other multi-teacher methods against Tiny-NewsRec, over seeds.

``python -m benchmarks.kd_methods [--quick] [--seeds 0,1,2] [--out DIR]``

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
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, md_table, run_job_kept, write_results
from benchmarks.quality import METRICS, PIPELINE_LAYERS, QUICK, seed_base_run, seed_list, student_run

NAMES = {"ndcg5": "nDCG@5", "ndcg10": "nDCG@10", "auc": "AUC", "mrr": "MRR"}
ROWS = (("ensemble", "Ensemble-Teacher"), ("tinybert_mt", "TinyBERT-MT"), ("newsbert_mt", "NewsBERT-MT"),
        ("mt_bert", "MT-BERT"), ("tiny_newsrec", "Tiny-NewsRec"))
PAPER_AUC = {"ensemble": 69.43, "tinybert_mt": 68.87, "newsbert_mt": 68.82, "mt_bert": 68.51, "tiny_newsrec": 69.58}
TINYBERT = ["distill.intermediate_weight=1", "distill.emb_weight=0", "distill.ce_weight_dp=0", "distill.ce_weight_ft=0"]
TEACHERS_FULL, TEACHERS_QUICK = 4, 2  # posttrain.teachers: the default, and QUICK's


def seed_rows(root: Path, seed: int, quick: bool) -> tuple[dict, dict]:
    """Every row's dev metrics for one seed, and each job's process seconds."""
    base_dir, base = seed_base_run(root, seed, quick)
    models = base["summary"]["models"]
    rows = {"ensemble": models["ensemble"], "tiny_newsrec": models["student"]}
    seconds = {"base pipeline (base_seed_S)": base["process_seconds"]}
    common = [f"train.seed={seed}", *(QUICK if quick else [])]
    m = TEACHERS_QUICK if quick else TEACHERS_FULL
    tiny = student_run(root, f"seed_{seed}_tinybert_mt", seed, quick, TINYBERT)
    rows["tinybert_mt"] = tiny["summary"]["models"]["student"]
    seconds["TinyBERT-MT (process)"] = tiny["process_seconds"]
    # what the intermediate losses cost: the M teachers' PLMs run online for every news the student encodes (the
    # training loops' time: the stages' wall time also holds the banks Tiny-NewsRec's base run built first)
    for label, run_dir in (("Tiny-NewsRec", base_dir), ("TinyBERT-MT", root / f"seed_{seed}_tinybert_mt")):
        stats = [run_dir / stage / "stats.json" for stage in ("distill_posttrain", "distill_finetune")]
        if all(f.exists() for f in stats):
            loops = sum(json.loads(f.read_text())["wall_seconds"] for f in stats)
            seconds[f"{label}: Stage I + Stage II training loops"] = loops
    mt_teachers = root / f"seed_{seed}_mt_bert_teachers"
    jobs = (("newsbert_mt", "NewsBERT-MT", ["stage=newsbert", f"newsbert.teachers={m}", f"distill.from_dir={base_dir}"]),
            ("mt_bert_teachers", "MT-BERT's teachers", ["stage=finetune_teachers", "teachers.init=plm"]),
            ("mt_bert", "MT-BERT (joint)", ["stage=newsbert", f"newsbert.teachers={m}",
                                            "newsbert.teacher_init=finetuned", f"distill.from_dir={mt_teachers}"]))
    for name, label, over in jobs:
        stage = over[0].split("=")[1]
        job = run_job_kept(f"seed_{seed}_{name}", [*over, *common], root, stage=stage, timeout=6 * 3600)
        seconds[label] = job["process_seconds"]
        if stage == "newsbert":
            rows[name] = job["metrics"]["student"]
    return {k: {m: v[m] for m in METRICS} for k, v in rows.items()}, seconds


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


def verdict(table: dict, paired: dict, seeds: int, quick: bool) -> list[str]:
    """What agrees with the paper's Table 4 and what does not, from the numbers."""
    auc = {name: 100 * table[name]["auc"]["mean"] for name, _ in ROWS}
    label = dict(ROWS)
    out = []
    if quick:
        out.append("- Quick settings: tiny random encoders trained a few steps, so these AUCs sit near chance (50) "
                   "and the comparisons below check the harness, not the paper.")
    for name, _ in ROWS[:-1]:
        d, sd = 100 * paired[name]["auc"]["mean"], 100 * paired[name]["auc"]["std"]
        paper = PAPER_AUC[name] - PAPER_AUC["tiny_newsrec"]
        clear = seeds > 1 and abs(d) > 2 * sd
        agrees = d < 0
        out.append(f"- {label[name]}: {d:+.2f} AUC points against Tiny-NewsRec (paired by seed"
                   + (f", ± {sd:.2f}" if seeds > 1 else ", one seed") + f"); the paper: {paper:+.2f}. "
                   + ("Agrees: below Tiny-NewsRec" if agrees else "Disagrees: not below Tiny-NewsRec")
                   + ("" if clear else " (within the seeds' spread)" if seeds > 1 else " (one seed: no spread)") + ".")
    students = [n for n in ("tinybert_mt", "newsbert_mt", "mt_bert")]
    worst = min(students, key=auc.get)
    out.append(f"- The paper's MT-BERT is the worst student; here the worst is {label[worst]} "
               f"({auc[worst]:.2f}): {'agrees' if worst == 'mt_bert' else 'disagrees'}.")
    best = max(auc, key=auc.get)
    out.append(f"- The paper's best row is Tiny-NewsRec; here it is {label[best]} ({auc[best]:.2f}): "
               f"{'agrees' if best == 'tiny_newsrec' else 'disagrees'}.")
    return out


def report(per_seed: dict, seconds: dict, info: dict, quick: bool, command: str, total: float) -> dict:
    table, paired = summarise(per_seed)
    many = len(per_seed) > 1
    jobs = sum(v for by in seconds.values() for job, v in by.items() if not job.endswith("training loops"))

    def cell(v):
        return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if many else f"{100 * v['mean']:.2f}"

    rows_json = {name: {str(s): per_seed[s][name] for s in sorted(per_seed)} for name, _ in ROWS}
    payload = {"machine": info, "quick": quick, "command": command, "seeds": sorted(per_seed), "rows": rows_json,
               "table": table, "paired": paired, "seconds": seconds, "jobs_seconds": jobs,
               "invocation_seconds": total, "student_layers": PIPELINE_LAYERS}
    m = TEACHERS_QUICK if quick else TEACHERS_FULL
    md = ["# Table 4: other multi-teacher methods against Tiny-NewsRec\n",
          f"Measured at commit {info['commit']} on {info['device']} (torch {info['torch']}; load average before "
          f"{', '.join(f'{x:.1f}' for x in info.get('load_average_before', ()))}: the cores are shared, so times are "
          f"indicative) with `{command}`; {len(per_seed)} seed(s)"
          f"{' (quick settings: tiny random encoders)' if quick else ''}. "
          f"Total wall time {jobs / 60:.1f} min (every job's process, the base runs included, whenever it ran; "
          f"this invocation {total / 60:.1f} min, reusing the jobs kept in `--out`). "
          f"M = {m} teachers, a {PIPELINE_LAYERS}-layer student; every row of a seed uses that seed's teachers "
          "and data order (`train.seed`). Mean ± standard deviation over seeds, in points (x100).\n",
          md_table(["method", *[NAMES[k] for k in METRICS], "paper AUC (Feeds, 4 layers)"],
                   [[label, *[cell(table[name][k]) for k in METRICS], f"{PAPER_AUC[name]:.2f}"]
                    for name, label in ROWS]),
          "\nDifference to Tiny-NewsRec, paired by seed, in points:\n",
          md_table(["method", *[NAMES[k] for k in METRICS]],
                   [[label, *[f"{100 * paired[name][k]['mean']:+.2f}" + (f" ± {100 * paired[name][k]['std']:.2f}"
                                                                         if many else "") for k in METRICS]]
                    for name, label in ROWS if name != "tiny_newsrec"]),
          "\nVerdict against the paper's Table 4:\n", "\n".join(verdict(table, paired, len(per_seed), quick)),
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
          "\nWall time of each job (s; a kept job's is from when it ran):\n",
          md_table(["seed", "job", "s"], [[s, job, f"{v:.0f}"] for s, by in seconds.items() for job, v in by.items()])]
    write_results("kd_methods_quick" if quick else "kd_methods", payload, "\n".join(md),
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
    p = argparse.ArgumentParser(prog="benchmarks.kd_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoders, 2 teachers, a few steps per stage")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (--quick: 0)")
    p.add_argument("--out", default="", help="keep the runs here, beside benchmarks.quality's (default: a temporary "
                                              "folder)")
    a = p.parse_args(argv)
    seeds = seed_list(a.seeds, a.quick)
    info = machine()
    command = "python -m benchmarks.kd_methods" + (" --quick" if a.quick else "") + \
        (f" --seeds {a.seeds}" if a.seeds else "")
    t0 = time.perf_counter()
    payload = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        per_seed, seconds = {}, {}
        for seed in seeds:
            per_seed[seed], seconds[seed] = seed_rows(root, seed, a.quick)
            payload = report(per_seed, seconds, info, a.quick, command, time.perf_counter() - t0)
    return payload


if __name__ == "__main__":
    main()
