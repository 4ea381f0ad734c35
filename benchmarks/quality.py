"""Tiny-NewsRec's Table 3 on our data: teachers and students, mean and spread over seeds.

``python -m benchmarks.quality [--quick] [--seeds 0,1,2] [--out DIR] [--fresh]``

A seed takes over an hour on 2 CPU cores: a seed already in ``benchmarks/results/quality.json`` with the same
settings is reused (``--fresh`` runs it again), so the three seeds may be measured by separate invocations.

Each seed runs ``stage=pipeline pipeline.baselines=true train.seed=S`` on the synthetic default with
all-MiniLM-L6-v2 (M = 4 teachers, a 2-layer student): the post-trained teachers (PLM-NR DP) against the plainly
finetuned teacher (PLM-NR FT), and the Tiny-NewsRec student against the same student finetuned without teachers
and against NewsBERT's student. The seed changes post-training order and initialisation, every finetuning's
data order, sampling and initialisation; the data set is the same. A teacher row is the mean over the M
post-trained teachers of a seed, then over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, machine, md_table, run_job, write_results

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
ROWS = (("teacher_dp", "PLM-NR DP: post-trained, then finetuned teachers (mean of M)"),
        ("plain", "PLM-NR FT: the plainly finetuned teacher"),
        ("student", "Tiny-NewsRec student"),
        ("student_plain", "the student finetuned without teachers"),
        ("newsbert_student", "NewsBERT's student"))
PAIRS = (("teacher_dp", "plain"), ("student", "student_plain"), ("student", "newsbert_student"))
QUICK = ["data.synthetic_users=300", "posttrain.teachers=2", "posttrain.snapshot_after=6", "posttrain.snapshot_every=3",
         "posttrain.holdout=50", "distill.stage1_epochs=1", "train.max_steps=6", "eval.max_impressions=100"]


def seed_models(summary: dict) -> dict:
    """One seed's rows: the post-trained teachers averaged, the others as they are."""
    models = summary["models"]
    teachers = [m for name, m in models.items() if name.startswith("teacher_")]
    rows = {"teacher_dp": {k: statistics.mean(t[k] for t in teachers) for k in METRICS}}
    rows["teacher_dp"]["layers"] = teachers[0]["layers"]
    for name in ("plain", "student", "student_plain", "newsbert_student"):
        rows[name] = {k: models[name][k] for k in (*METRICS, "layers")}
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 users, 2 teachers, a few steps per stage")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--fresh", action="store_true", help="run every seed, even those already in the results file")
    p.add_argument("--report", metavar="JSON", help="only re-render the tables from a results file's runs")
    a = p.parse_args(argv)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        return report({int(k): v for k, v in saved["runs"].items()}, saved["machine"], saved["quick"])
    seeds = [int(s) for s in a.seeds.split(",")]
    info = machine()
    committed = committed_runs(a.quick) if not a.fresh else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        runs = {}
        for seed in seeds:
            overrides = ["stage=pipeline", "pipeline.baselines=true", f"train.seed={seed}", *(QUICK if a.quick else [])]
            done = root / f"seed_{seed}" / "quality_run.json"
            if done.exists():  # a finished seed of an earlier, interrupted invocation with the same --out
                runs[seed] = json.loads(done.read_text())
                if not same_settings(runs[seed], overrides):
                    raise SystemExit(f"{done} was run with other settings ({runs[seed]['command']}); use another --out")
                print(f"seed {seed}: reusing {done}", flush=True)
            elif seed in committed and same_settings(committed[seed], overrides):
                runs[seed] = committed[seed]  # measured by an earlier invocation (perhaps another session)
                print(f"seed {seed}: reusing the committed run in {RESULTS / 'quality.json'} (--fresh runs it again)",
                      flush=True)
            else:
                run = run_job(f"seed_{seed}", overrides, root, timeout=6 * 3600)
                runs[seed] = {"command": run["command"], "process_seconds": run["process_seconds"],
                              "summary": run["metrics"]}
                done.write_text(json.dumps(runs[seed], indent=2) + "\n")
            payload = report(runs, info, a.quick)  # rewritten after every seed: an interrupted run keeps its seeds
    return payload


def same_settings(run: dict, overrides: list[str]) -> bool:
    return all(o in run["command"].split() for o in overrides)


def committed_runs(quick: bool) -> dict:
    """The seeds already in benchmarks/results/quality[_quick].json: a seed takes over an hour here, so the three
    are measured across invocations, and the table is rewritten with every seed that exists."""
    path = RESULTS / ("quality_quick.json" if quick else "quality.json")
    if not path.exists():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).get("runs", {}).items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(runs: dict, info: dict, quick: bool) -> dict:
    per_seed = {seed: seed_models(r["summary"]) for seed, r in runs.items()}
    table = {}
    for name, _ in ROWS:
        table[name] = {k: dict(zip(("mean", "std"), _mean_std([per_seed[s][name][k] for s in per_seed])))
                       for k in METRICS}
        table[name]["layers"] = next(iter(per_seed.values()))[name]["layers"]
    seconds = {seed: r["summary"]["seconds"] for seed, r in runs.items()}
    paired = {f"{a} - {b}": {k: dict(zip(("mean", "std"), _mean_std([per_seed[s][a][k] - per_seed[s][b][k]
                                                                       for s in per_seed]))) for k in METRICS}
              for a, b in PAIRS}
    payload = {"machine": info, "quick": quick, "seeds": list(runs), "table": table, "paired": paired,
               "per_seed": per_seed, "seconds": seconds, "runs": runs}
    many = len(runs) > 1  # one seed has no spread: say so instead of printing ± 0
    cell = lambda v: f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if many else f"{100 * v['mean']:.2f}"
    rows = [[what, table[name]["layers"], *[cell(table[name][k]) for k in METRICS]] for name, what in ROWS]
    md = ["# Quality: Tiny-NewsRec Table 3 on the synthetic default\n",
          f"Device: {info['device']}, torch {info['torch']}. Each seed: `python -m speedyrec.train stage=pipeline "
          f"pipeline.baselines=true train.seed=S`{' (quick settings)' if quick else ''}; all-MiniLM-L6-v2, M = 4 "
          f"teachers, 2-layer students. Mean ± standard deviation over seeds {', '.join(map(str, runs))}, in points "
          f"(x100).{'' if many else ' ONLY ONE SEED SO FAR: no spread, and no claim about ordering.'}\n",
          md_table(["model", "layers", "AUC", "MRR", "nDCG@5", "nDCG@10"], rows),
          "\nPaired by seed (the same seed gives both runs the same data order), the difference in points:\n",
          md_table(["comparison", "AUC", "MRR", "nDCG@5", "nDCG@10"],
                   [[k, *[f"{100 * v[m]['mean']:+.2f}" + (f" ± {100 * v[m]['std']:.2f}" if many else "") for m in METRICS]]
                    for k, v in paired.items()]),
          "\nAUC of each seed:\n",
          md_table(["seed", *[n for n, _ in ROWS]],
                   [[s, *[f"{100 * per_seed[s][n]['auc']:.2f}" for n, _ in ROWS]] for s in per_seed]),
          "\nWall time of each step (s), per seed:\n",
          md_table(["seed", *next(iter(seconds.values())).keys()],
                   [[seed, *[f"{v:.0f}" for v in s.values()]] for seed, s in seconds.items()])]
    write_results("quality_quick" if quick else "quality", payload, "\n".join(md), plot=lambda path: _plot(path, table))
    print("\n".join(md))
    return payload


def _plot(path, table) -> None:
    import matplotlib.pyplot as plt

    names = [n for n, _ in ROWS]
    fig, ax = plt.subplots(figsize=(8, 4))
    means = [100 * table[n]["auc"]["mean"] for n in names]
    stds = [100 * table[n]["auc"]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=["#4c72b0", "#8c8c8c", "#dd8452", "#8c8c8c", "#55a868"])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(["teachers DP", "teacher FT", "Tiny-NewsRec", "student FT", "NewsBERT"])
    ax.set_ylabel("dev AUC (x100)")
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(lo - 2, max(m + s for m, s in zip(means, stds)) + 1)
    ax.set_title("Teachers and 2-layer students, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
