"""Tiny-NewsRec's ablations (the paper's Figures 3 and 4): each stage, and each loss term, of the two-stage
distillation removed, against the full student; mean and spread over seeds.

``python -m benchmarks.ablation [--quick] [--seeds 0,1,2] [--out DIR] [--kept-only] [--fresh]``

Rows (the 2-layer student of all-MiniLM-L6-v2, M = 4 teachers, on the synthetic default):

- ``full``: Tiny-NewsRec's student; ``no_both``: the student finetuned without teachers (the PLM's first layers).
  Both are the seed's base run, ``base_seed_S`` (``stage=pipeline pipeline.baselines=true
  pipeline.newsbert=false``, benchmarks.quality's ``seed_base_run``), in the same ``--out``: kept there, or run
  first.
- Figure 3, each stage: ``no_stage1`` (``distill.student_init=plm``: Stage II starts from the PLM's first
  layers), ``no_stage2`` (``pipeline.stage2=false``: Stage I, then its student finetuned on clicks without
  teachers, as ``no_both`` is).
- Figure 4, each loss, removed in both stages as the paper does: ``no_distill`` (``distill.distill_weight=0``, the
  soft labels of the teachers' weighted scores), ``no_emb`` (``distill.emb_weight=0``, the projected MSE of title
  and body, then of news and user vectors), ``no_target`` (``distill.ce_weight_dp=0 distill.ce_weight_ft=0``, the
  student's own InfoNCE and click CE). A term off is not computed.

Every other row runs ``stage=pipeline`` with its switch and ``pipeline.teachers_from`` the seed's base run: only the
student's stages train again. Cost here (2 cores, from quality.md's step times: Stage I ~5.5 min, Stage II ~6.5 min,
the student without teachers ~6 min): ``no_stage1`` ~7 min, the other five rows ~12 min each, so ~70 min per seed
and ~3.5 hours for 3 seeds, plus ~54 min per seed for a base run not kept in ``--out``. Runs are kept in
``--out`` (an interrupted invocation continues), and recorded in ``benchmarks/results/ablation.json``: a seed
measured in another session is reused. ``--quick`` checks the harness on quality's tiny random encoders in a few
minutes. Differences to ``full`` are paired by seed (every run of a seed shares its teachers and data order).

Not yet a row: ``body_512``, post-training and Stage I at the paper's 512 body tokens read as BusLM segments
(e.g. 8 of 64) instead of today's 64. Post-training and Stage I read a body as one sequence and refuse
engine.buslm; the row needs a key of their own for the body's segments, and its own pipeline per seed (its
teachers differ, so they cannot be linked).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, md_table, note_reused, write_results
from benchmarks.quality import (METRICS, base_name, base_overrides, same_settings, seed_base_run, seed_list,
                                student_run)

# row -> (label, the student's switch; None: the base run's model, the model's name in the pipeline's table)
ROWS = {
    "full": ("Tiny-NewsRec's student (both stages, every loss)", None, "student"),
    "no_stage1": ("without Stage I: Stage II starts from the PLM's first layers", ["distill.student_init=plm"],
                  "student"),
    "no_stage2": ("without Stage II: Stage I, then finetuned on clicks without teachers", ["pipeline.stage2=false"],
                  "student_stage1"),
    "no_both": ("without both: the PLM's first layers finetuned without teachers", None, "student_plain"),
    "no_distill": ("without the distillation loss (both stages)", ["distill.distill_weight=0"], "student"),
    "no_emb": ("without the embedding loss (both stages)", ["distill.emb_weight=0"], "student"),
    "no_target": ("without the target loss (both stages)", ["distill.ce_weight_dp=0", "distill.ce_weight_ft=0"],
                  "student"),
}
FIGURES = {"Figure 3: each stage": ("full", "no_stage1", "no_stage2", "no_both"),
           "Figure 4: each loss": ("full", "no_distill", "no_emb", "no_target")}


def run_name(row: str, seed: int) -> str:
    return f"ablation_{row}_seed_{seed}"


def results_name(quick: bool) -> str:
    return "ablation_quick" if quick else "ablation"


def committed_runs(quick: bool) -> dict:
    """The runs already in the results file, by run name: the seeds may be measured in several sessions."""
    path = RESULTS / f"{results_name(quick)}.json"
    return json.loads(path.read_text()).get("runs", {}) if path.exists() else {}


def seed_rows(root: Path, seed: int, quick: bool, committed: dict, may_run: bool) -> tuple[dict, dict]:
    """One seed's metrics per row, and the run records they come from (by run name). The seed's base run is run
    (or read from ``root``) only where a row must run, or where the results file does not record it."""
    metrics, runs = {}, {}
    for row, (_, switch, model) in ROWS.items():
        if switch is not None:
            name = run_name(row, seed)
            run = student_run(root, name, seed, quick, switch, committed.get(name), may_run=may_run)
            if run is not None:
                runs[name] = run
                metrics[row] = {k: run["summary"]["models"][model][k] for k in METRICS}
    name = base_name(seed)
    recorded = committed.get(name)
    if (root / name / "quality_run.json").exists() or recorded is None or \
            not same_settings(recorded, base_overrides(seed, quick)):
        base = seed_base_run(root, seed, quick, may_run=may_run)
        recorded = None if base is None else base[1]
    else:
        print(f"{name}: reusing the recorded run (--fresh runs it again)", flush=True)
        note_reused(name)
    if recorded is not None:
        runs[name] = recorded
        for row, (_, switch, model) in ROWS.items():
            if switch is None:
                metrics[row] = {k: recorded["summary"]["models"][model][k] for k in METRICS}
    return {row: metrics[row] for row in ROWS if row in metrics}, runs


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(per_seed: dict) -> dict:
    """rows -> {label, switch, model, seeds: {seed: metrics}, mean: {metric: mean, std}, minus_full: the paired
    difference to ``full`` over the seeds that have both}."""
    rows = {}
    for row, (label, switch, model) in ROWS.items():
        seeds = {s: m[row] for s, m in per_seed.items() if row in m}
        if not seeds:
            continue
        entry = {"label": label, "switch": switch or ["(the seed's base run)"], "model": model, "seeds": seeds,
                 "mean": {k: _mean_std([m[k] for m in seeds.values()]) for k in METRICS}}
        paired = [s for s in seeds if "full" in per_seed[s]]
        if row != "full" and paired:
            entry["minus_full"] = {k: _mean_std([seeds[s][k] - per_seed[s]["full"][k] for s in paired])
                                   for k in METRICS}
            entry["minus_full"]["seeds"] = paired
        rows[row] = entry
    return rows


def verdict(rows: dict) -> list[str]:
    """What agrees with the paper's Figures 3 and 4 and what does not, in words, from the paired AUC differences:
    a row is below ``full`` when its mean difference is negative and larger than its spread over seeds."""
    def drop(row):
        d = rows.get(row, {}).get("minus_full")
        return None if d is None else (-d["auc"]["mean"], d["auc"]["std"], len(d["seeds"]))

    lines = []
    for row in ROWS:
        d = drop(row)
        if row == "full" or d is None:
            continue
        mean, std, n = d
        spread = f" ± {100 * std:.2f}" if n > 1 else ""
        if n > 1 and abs(mean) <= std:
            word = "within the spread over seeds: no clear effect (the paper: a drop)"
        elif mean > 0:
            word = "below the full student, as in the paper"
        else:
            word = "above the full student: disagrees with the paper"
        lines.append(f"- `{row}`: AUC {-100 * mean:+.2f}{spread} points against `full` over {n} seed(s), {word}.")

    def order(first, second, claim):
        a, b = drop(first), drop(second)
        if a is None or b is None:
            return
        agrees = a[0] > b[0]
        lines.append(f"- {claim}: against `full`, `{first}` {-100 * a[0]:+.2f} AUC points, `{second}` "
                     f"{-100 * b[0]:+.2f}: " + ("agrees." if agrees else "disagrees."))

    # the paper's words: Stage II "plays a critical role", Stage I helps too; the distillation loss is "the most
    # essential", the embedding loss "also important", the target loss "also useful"
    order("no_stage2", "no_stage1", "Figure 3: Stage II matters more than Stage I")
    order("no_distill", "no_emb", "Figure 4: the distillation loss matters more than the embedding loss")
    order("no_distill", "no_target", "Figure 4: the distillation loss matters more than the target loss")
    order("no_emb", "no_target", "Figure 4: the embedding loss matters more than the target loss")
    if any(len(e["minus_full"]["seeds"]) < 2 for e in rows.values() if "minus_full" in e):
        lines.append("- Fewer than 2 seeds for some row: no spread to judge a difference by; these words are "
                     "provisional.")
    return lines


def report(per_seed: dict, runs: dict, info: dict, quick: bool, command: str, seconds: float) -> dict:
    rows = summarize(per_seed)
    payload = {"machine": info, "quick": quick, "command": command, "seeds": sorted(per_seed),
               "rows": rows, "figures": FIGURES, "wall_seconds_this_invocation": seconds,
               "run_seconds": {name: r["summary"].get("seconds", {}) for name, r in runs.items()}, "runs": runs}
    cell = lambda v, many: f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if many else f"{100 * v['mean']:.2f}"  # noqa: E731
    table = [[f"`{r}`", e["label"], *[cell(e["mean"][k], len(e["seeds"]) > 1) for k in METRICS], len(e["seeds"])]
             for r, e in rows.items()]
    paired = [[f"`{r}` - `full`", len(e["minus_full"]["seeds"]),
               *[f"{100 * e['minus_full'][k]['mean']:+.2f}" + (f" ± {100 * e['minus_full'][k]['std']:.2f}"
                                                               if len(e["minus_full"]["seeds"]) > 1 else "")
                 for k in METRICS]] for r, e in rows.items() if "minus_full" in e]
    per_seed_auc = [[s, *[f"{100 * per_seed[s][r]['auc']:.2f}" if r in per_seed[s] else "" for r in rows]]
                    for s in sorted(per_seed)]
    step_seconds = sum(sum(v for v in r["summary"].get("seconds", {}).values()) for r in runs.values())
    md = ["# Ablation: Tiny-NewsRec's Figures 3 and 4 on the synthetic default\n",
          f"Each row is a 2-layer student of {'a tiny random encoder (--quick)' if quick else 'all-MiniLM-L6-v2'}, "
          "taught by the M post-trained, finetuned teachers of its seed (linked from the seed's base run, "
          "`base_seed_S`, whose students are `full` and `no_both`). Mean ± standard deviation over "
          "seeds, in points (x100).\n",
          md_table(["row", "what", "AUC", "MRR", "nDCG@5", "nDCG@10", "seeds"], table),
          "\nPaired by seed (a seed's runs share its teachers and data order), the difference to `full` in points:\n",
          md_table(["comparison", "seeds", "AUC", "MRR", "nDCG@5", "nDCG@10"], paired),
          "\nAUC of each seed:\n", md_table(["seed", *rows], per_seed_auc),
          "\n## Verdict\n", "Generated from the numbers above; the paper (Feeds data, a 4-layer student of UniLM): "
          "removing either stage or any loss lowers the student, Stage II more than Stage I, the distillation "
          "loss most, the embedding loss next, the target loss least.\n", *verdict(rows),
          "\n## How it was measured\n",
          f"Commit {info.get('commit') or 'unknown'}; {info['device']}, torch {info['torch']}, "
          f"{info.get('threads')} threads. Command: `{command}`. Switches per row:\n",
          md_table(["row", "settings (besides the seed's base run's)"],
                   [[f"`{r}`", " ".join(f"`{s}`" for s in e["switch"])] for r, e in rows.items()]),
          f"\nTraining time of the runs these rows read (each run's own steps; the base runs train the teachers, "
          f"the others link them): "
          f"{step_seconds / 60:.1f} min; this invocation: {seconds / 60:.1f} min (kept runs are reused, not run "
          "again). Each run's steps (s):\n",
          md_table(["run", "steps"], [[name, ", ".join(f"{k} {v:.0f}" for k, v in payload["run_seconds"][name].items())]
                                      for name in sorted(runs)])]
    write_results(results_name(quick), payload, "\n".join(md), plot=lambda path: _plot(path, payload))
    print("\n".join(md), flush=True)
    return payload


def _plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    rows = d["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    lows = []
    for ax, (title, names) in zip(axes, d["figures"].items()):
        names = [n for n in names if n in rows]
        means = [100 * rows[n]["mean"]["auc"]["mean"] for n in names]
        stds = [100 * rows[n]["mean"]["auc"]["std"] for n in names]
        lows += [m - s for m, s in zip(means, stds)]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4,
               color=["#dd8452" if n == "full" else "#8c8c8c" for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=9)
        ax.set_title(title)
    axes[0].set_ylabel("dev AUC (x100), mean ± std over seeds")
    if lows:
        top = max(100 * r["mean"]["auc"]["mean"] + 100 * r["mean"]["auc"]["std"] for r in rows.values())
        axes[0].set_ylim(min(lows) - 1, top + 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quality's tiny settings: checks the harness in minutes")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (--quick: 0)")
    p.add_argument("--out", default="", help="keep the runs here, beside the seeds' base runs (base_seed_S) "
                   "(default: a temporary folder)")
    p.add_argument("--fresh", action="store_true", help="run every row, even those recorded in the results file")
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or "
                   "recorded, and name the ones missing")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    seeds = seed_list(a.seeds, a.quick)
    command = "python -m benchmarks.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    committed = {} if a.fresh else committed_runs(a.quick)
    per_seed, runs, payload = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            metrics, seed_runs = seed_rows(root, seed, a.quick, committed, may_run=not a.kept_only)
            if metrics:
                per_seed[str(seed)] = metrics
                runs.update(seed_runs)
            # rewritten after every seed: an interrupted invocation keeps what it measured
            payload = report(per_seed, runs, info, a.quick, command, time.perf_counter() - t0)
    if not per_seed:
        raise SystemExit(f"benchmarks.ablation: no run of seeds {seeds} is kept in {root} or recorded")
    return payload


if __name__ == "__main__":
    main()
