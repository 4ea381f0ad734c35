"""Tiny-NewsRec's ablations (the paper's Figures 3 and 4): each stage, and each loss term, of the two-stage
distillation removed, against the full student; mean and spread over seeds.

``python -m benchmarks.ablation [--quick] [--seeds 0,1,2] [--rows full,no_stage1,...] [--out DIR] [--kept-only] [--fresh]``

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
- Post-training's body length: ``body_512`` (``posttrain.body_segments=8``): post-training and Stage I read a body's
  first 512 tokens as 8 BusLM segments of 64 (the paper's 512; the other rows read 64 as one sequence). Its teachers
  differ, so it cannot link the seed's base run's: it runs its own pipeline (``stage=pipeline train.seed=S
  posttrain.body_segments=8``, no baselines), and the md gives its teachers' AUC beside the base run's and the wall
  time of post-training + Stage I in both (the cost).

The rows of Figures 3 and 4 run ``stage=pipeline`` with their switch and ``pipeline.teachers_from`` the seed's base
run: only the student's stages train again. Cost here (2 cores, measured for seed 1 with the cores to itself): the
five rows that link the base run 22 min together, and the base run 32 min when not kept in ``--out`` (both take
2-3x that when other jobs share the cores), and ``body_512``'s own pipeline (below). Runs are kept in
``--out`` (an interrupted invocation continues), and recorded in ``benchmarks/results/ablation.json``: a seed
measured in another session is reused. ``--quick`` checks the harness on quality's tiny random encoders in a few
minutes. Differences to ``full`` are paired by seed (every run of a seed shares its teachers and data order;
``body_512`` shares the data order and initialisation, its teachers are its own).

``body_512``'s cost: 8x the body tokens in every trained layer, whether one sequence or segments. Measured on the 2
busy cores (noisy: other runs shared them), one post-training batch of 32 bodies through MiniLM-L6 (3 frozen, 3
trained layers, forward and backward, interleaved rounds) took 4.3 s at 64 tokens, 22 s as 8 BusLM segments of 64
and 38 s as one 512-token sequence (BusLM ~1.7x cheaper than the one sequence, which also pads to its longest body);
a whole post-training step, titles and optimizer included, 3.6x the 64-token one. From these ratios, post-training +
Stage I (their held-out retrievals and the teachers' body bank included) take ~45 min per seed instead of ~9, and
the row's pipeline ~80 min per seed (its teachers' finetuning and Stage II as in the base run), ~4 hours for 3
seeds; the md records the measured times. Its post-training keeps a frozen-prefix cache of ~3 GiB (every body's
512 token states after the 3 frozen layers, float32) in ``engine.frozen_cache_dir``.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import clear_mark, committed_runs, machine, md_table, write_results
from benchmarks.quality import (METRICS, QUICK, base_name, base_run_record, experiment_parser, obtain, recorded_seeds,
                                seed_list, student_run)

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
    "body_512": ("post-training and Stage I at 512 body tokens as 8 BusLM segments of 64",
                 ["posttrain.body_segments=8"], "student"),
}
# rows whose switch changes post-training: they train their own teachers instead of linking the base run's
OWN_TEACHERS = ("body_512",)
FIGURES = {"Figure 3: each stage": ("full", "no_stage1", "no_stage2", "no_both"),
           "Figure 4: each loss": ("full", "no_distill", "no_emb", "no_target"),
           "Post-training's body tokens": ("full", "body_512")}


def run_name(row: str, seed: int) -> str:
    return f"ablation_{row}_seed_{seed}"


def own_pipeline_run(root: Path, name: str, seed: int, quick: bool, switch: list[str], committed: dict | None,
                     may_run: bool) -> dict | None:
    """``stage=pipeline`` of seed ``seed`` with ``switch``, training its own teachers (no baselines: the row reads
    its student and teachers); kept in ``root/name`` or ``committed``, else run now unless ``may_run`` is false."""
    overrides = ["stage=pipeline", f"train.seed={seed}", *switch, *(QUICK if quick else [])]
    return obtain(root, name, overrides, committed, may_run=may_run)


def results_name(quick: bool) -> str:
    return "ablation_quick" if quick else "ablation"


def seed_rows(root: Path, seed: int, quick: bool, committed: dict, may_run: bool,
              progress=lambda metrics, runs: None, rows: tuple = tuple(ROWS)) -> tuple[dict, dict]:
    """One seed's metrics per row, and the run records they come from (by run name). The seed's base run is run
    (or read from ``root``) only where a row must run, or where the results file does not record it.
    ``progress(metrics, runs)`` is called after every row: a seed takes hours, and its finished rows are written
    down before the next one runs (a session may end in between). Rows outside ``rows`` are not run, only read
    from the results file where it records them."""
    metrics, runs = {}, {}
    name = base_name(seed)

    def base_rows(recorded: dict) -> None:
        runs[name] = recorded
        for row, (_, switch, model) in ROWS.items():
            if switch is None:
                metrics[row] = {k: recorded["summary"]["models"][model][k] for k in METRICS}

    def ordered() -> dict:
        return {row: metrics[row] for row in ROWS if row in metrics}

    for row, (_, switch, model) in ROWS.items():
        if switch is not None:
            run_name_ = run_name(row, seed)
            fetch = own_pipeline_run if row in OWN_TEACHERS else student_run
            run = fetch(root, run_name_, seed, quick, switch, committed.get(run_name_),
                        may_run=may_run and row in rows)
            if run is not None:
                runs[run_name_] = run
                metrics[row] = {k: run["summary"]["models"][model][k] for k in METRICS}
            if (root / name / "quality_run.json").exists():  # the base run, kept: its rows are known already
                base_rows(json.loads((root / name / "quality_run.json").read_text()))
            progress(ordered(), dict(runs))
    recorded = base_run_record(root, seed, quick, committed, may_run)
    if recorded is not None:
        base_rows(recorded)
    return ordered(), runs


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
                 "teachers": "own" if row in OWN_TEACHERS else "the base run's",
                 "mean": {k: _mean_std([m[k] for m in seeds.values()]) for k in METRICS}}
        paired = [s for s in seeds if "full" in per_seed[s]]
        if row != "full" and paired:
            entry["minus_full"] = {k: _mean_std([seeds[s][k] - per_seed[s]["full"][k] for s in paired])
                                   for k in METRICS}
            entry["minus_full"]["seeds"] = paired
        rows[row] = entry
    return rows


def teacher_side(summary: dict) -> dict:
    """What a pipeline's post-training gave its teachers and what it and Stage I cost: the M teachers' mean dev AUC,
    the ensemble's, the snapshots' mean held-out title retrieval (post-training's own task, on the run's own body
    length), the Stage I student's, and the two steps' wall time (s); None where the run did not record it."""
    models, seconds = summary["models"], summary.get("seconds", {})
    aucs = [m["auc"] for name, m in models.items() if name.startswith("teacher_")]
    snaps = summary.get("posttrain") or []
    stage1 = ((summary.get("stage1") or {}).get("student") or {}).get("final") or {}
    both = [seconds.get(k) for k in ("posttrain", "distill_posttrain")]
    return {"teacher_auc": statistics.mean(aucs) if aucs else None,
            "ensemble_auc": models.get("ensemble", {}).get("auc"),
            "teacher_retrieval": statistics.mean(s["retrieval_acc"] for s in snaps) if snaps else None,
            "stage1_retrieval": stage1.get("retrieval_acc"),
            "posttrain_seconds": both[0], "stage1_seconds": both[1],
            "seconds": sum(both) if None not in both else None}


def teacher_sides(runs: dict, seeds) -> dict:
    """seed -> {"full": the base run's teacher_side, "body_512": its own run's}, for the seeds that ran body_512."""
    out = {}
    for seed in seeds:
        own = runs.get(run_name("body_512", int(seed)))
        if own is not None:
            base = runs.get(base_name(int(seed)))
            out[str(seed)] = {"body_512": teacher_side(own["summary"]),
                              **({"full": teacher_side(base["summary"])} if base is not None else {})}
    return out


def teacher_difference(teachers: dict) -> tuple[dict, float, int] | None:
    """body_512's teachers against the base run's, over the seeds that have both: the mean AUC difference (mean and
    std over seeds), the mean ratio of post-training + Stage I's wall time, and the number of seeds."""
    both = [t for t in teachers.values() if "full" in t and t["full"]["teacher_auc"] is not None
            and t["body_512"]["teacher_auc"] is not None and t["full"]["seconds"] and t["body_512"]["seconds"]]
    if not both:
        return None
    auc = _mean_std([t["body_512"]["teacher_auc"] - t["full"]["teacher_auc"] for t in both])
    return auc, statistics.mean(t["body_512"]["seconds"] / t["full"]["seconds"] for t in both), len(both)


def verdict(rows: dict, teachers: dict | None = None) -> list[str]:
    """What agrees with the paper's Figures 3 and 4 and what does not, in words, from the paired AUC differences:
    a row is below ``full`` when its mean difference is negative and larger than its spread over seeds (a weak test
    with 3 seeds), and marked clear beyond twice its spread (student_gap's rule; see ``clear_mark``). ``body_512``,
    the paper's own body length, is said in plain words, and so is what it did to its teachers (``teachers``:
    teacher_sides) and what it cost."""
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
        if row == "body_512":  # not an ablation: the paper's own body length, which it does not vary
            if n > 1 and abs(mean) <= std:
                word = "within the spread over seeds: no clear effect of the longer bodies"
            else:
                word = "below the full student: the longer bodies do not help here" if mean > 0 else \
                    "above the full student: the longer bodies help"
        elif n > 1 and abs(mean) <= std:
            word = "within the spread over seeds: no clear effect (the paper: a drop)"
        elif mean > 0:
            word = "below the full student, as in the paper"
        else:
            word = "above the full student: disagrees with the paper"
        lines.append(f"- `{row}`: AUC {-100 * mean:+.2f}{spread} points against `full` over {n} seed(s), {word}"
                     f"{clear_mark(mean, std, n)}.")

    def order(first, second, claim):
        """The claim that removing ``first`` costs more than removing ``second``, judged on their paired
        difference (seed by seed, first's AUC - second's): told apart only when it exceeds its spread over seeds."""
        a, b = drop(first), drop(second)
        if a is None or b is None:
            return
        f_seeds, s_seeds = rows[first]["seeds"], rows[second]["seeds"]
        paired = [f_seeds[k]["auc"] - s_seeds[k]["auc"] for k in f_seeds if k in s_seeds]
        head = (f"- {claim}: against `full`, `{first}` {-100 * a[0]:+.2f} AUC points, `{second}` "
                f"{-100 * b[0]:+.2f}")
        if len(paired) > 1:
            d = _mean_std(paired)
            head += f" (paired, `{first}` - `{second}`: {100 * d['mean']:+.2f} ± {100 * d['std']:.2f})"
            if abs(d["mean"]) <= d["std"]:
                lines.append(head + ": not told apart (within the spread over seeds).")
                return
        lines.append(head + (": agrees" if a[0] > b[0] else ": disagrees")
                     + (clear_mark(d["mean"], d["std"], len(paired)) if len(paired) > 1 else "") + ".")

    # the paper's words: Stage II "plays a critical role", Stage I helps too; the distillation loss is "the most
    # essential", the embedding loss "also important", the target loss "also useful"
    order("no_stage2", "no_stage1", "Figure 3: Stage II matters more than Stage I")
    order("no_distill", "no_emb", "Figure 4: the distillation loss matters more than the embedding loss")
    order("no_distill", "no_target", "Figure 4: the distillation loss matters more than the target loss")
    order("no_emb", "no_target", "Figure 4: the embedding loss matters more than the target loss")
    body = teacher_difference(teachers or {})
    if body is not None:
        auc, cost, n = body
        spread = f" ± {100 * auc['std']:.2f}" if n > 1 else ""
        lines.append(f"- `body_512`'s own teachers: mean AUC {100 * auc['mean']:+.2f}{spread} points against the base "
                     f"run's over {n} seed(s); post-training + Stage I took {cost:.1f}x the time.")
    if any(len(e["minus_full"]["seeds"]) < 2 for e in rows.values() if "minus_full" in e):
        lines.append("- Fewer than 2 seeds for some row: no spread to judge a difference by; these words are "
                     "provisional.")
    return lines


def body_512_section(teachers: dict) -> list[str]:
    """The md's lines on body_512's teachers and cost, beside the base run's (none where no seed ran body_512)."""
    if not teachers:
        return []
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    sec = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    table = [[seed, f"`{run}`", "8 x 64 (BusLM)" if run == "body_512" else "64", pct(t["teacher_auc"]),
              pct(t["ensemble_auc"]), pct(t["teacher_retrieval"]), pct(t["stage1_retrieval"]),
              sec(t["posttrain_seconds"]), sec(t["stage1_seconds"]), sec(t["seconds"])]
             for seed, sides in teachers.items() for run, t in sorted(sides.items(), key=lambda kv: kv[0] != "full")]
    lines = ["\n## `body_512`: its teachers and its cost\n",
             "Post-training and Stage I at 512 body tokens change the teachers too. Per seed, `body_512`'s run beside "
             "the base run (`full`'s teachers, a body's first 64 tokens as one sequence): the M post-trained, "
             "finetuned teachers' mean dev AUC and their ensemble's (x100); held-out title retrieval (top-1 among the "
             "held-out news' titles, post-training's own task, each run on its own body length): the snapshots' mean "
             "and the Stage I student's; each step's wall time (s).\n",
             md_table(["seed", "run", "body tokens", "teachers' AUC", "ensemble AUC", "teachers' retrieval",
                       "Stage I student's retrieval", "post-training s", "Stage I s", "both s"], table)]
    return lines


def report(per_seed: dict, runs: dict, info: dict, quick: bool, command: str, seconds: float) -> dict:
    rows = summarize(per_seed)
    teachers = teacher_sides(runs, sorted(per_seed))
    payload = {"machine": info, "quick": quick, "command": command, "seeds": sorted(per_seed),
               "rows": rows, "figures": FIGURES, "body_512_teachers": teachers,
               "wall_seconds_this_invocation": seconds,
               "run_seconds": {name: r["summary"].get("seconds", {}) for name, r in runs.items()},
               "verdict": verdict(rows, teachers), "runs": runs}
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
          "`base_seed_S`, whose students are `full` and `no_both`), except `body_512`, whose post-training differs: "
          "its pipeline trains its own teachers. Mean ± standard deviation over seeds, in points (x100).\n",
          md_table(["row", "what", "AUC", "MRR", "nDCG@5", "nDCG@10", "seeds"], table),
          "\nPaired by seed (a seed's runs share its teachers and data order), the difference to `full` in points:\n",
          md_table(["comparison", "seeds", "AUC", "MRR", "nDCG@5", "nDCG@10"], paired),
          "\nAUC of each seed:\n", md_table(["seed", *rows], per_seed_auc),
          "\n## Verdict\n", "Generated from the numbers above; the paper (Feeds data, a 4-layer student of UniLM): "
          "removing either stage or any loss lowers the student, Stage II more than Stage I, the distillation "
          "loss most, the embedding loss next, the target loss least. The paper post-trains on 512 body tokens and "
          "does not vary it. A difference counts when its mean paired over seeds exceeds its spread (standard "
          "deviation) over seeds, a weak test with 3 seeds; one beyond twice its spread is marked clear.\n",
          *payload["verdict"], *body_512_section(teachers),
          "\n## How it was measured\n",
          f"Commit {info.get('commit') or 'unknown'}; {info['device']}, torch {info['torch']}, "
          f"{info.get('threads')} threads. Command: `{command}`. Switches per row:\n",
          md_table(["row", "settings (besides the seed's base run's)"],
                   [[f"`{r}`", ("its own pipeline, no baselines: " if r in OWN_TEACHERS else "")
                     + " ".join(f"`{s}`" for s in e["switch"])] for r, e in rows.items()]),
          f"\nTraining time of the runs these rows read (each run's own steps; the base runs and `body_512`'s train "
          f"teachers, the others link the base runs'): "
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
    fig, axes = plt.subplots(1, len(d["figures"]), figsize=(5.5 * len(d["figures"]), 4), sharey=True)
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
    p = experiment_parser("benchmarks.ablation", __doc__)
    p.add_argument("--rows", default=",".join(ROWS), help="the rows that may run (comma-separated; default all); "
                   "the others are tabulated where recorded. body_512 alone takes ~80 min per seed")
    a = p.parse_args(argv)
    rows = tuple(r.strip() for r in a.rows.split(",") if r.strip())
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"benchmarks.ablation: unknown rows {unknown}; rows are {list(ROWS)}")
    t0 = time.perf_counter()
    seeds = seed_list(a.seeds, a.quick)
    command = "python -m benchmarks.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    committed = committed_runs(results_name(a.quick), a.fresh)
    per_seed, runs, payload = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in sorted(set(seeds) | set(recorded_seeds(committed))):
            def progress(metrics, seed_runs, seed=seed):  # rewritten after every row: an interruption keeps them
                if metrics:
                    report({**per_seed, str(seed): metrics}, {**runs, **seed_runs}, info, a.quick, command,
                           time.perf_counter() - t0)

            # a recorded seed not asked for is tabulated from its records, never run
            metrics, seed_runs = seed_rows(root, seed, a.quick, committed, may_run=not a.kept_only and seed in seeds,
                                           progress=progress, rows=rows)
            if metrics:
                per_seed[str(seed)] = metrics
                runs.update(seed_runs)
                payload = report(per_seed, runs, info, a.quick, command, time.perf_counter() - t0)
    if not per_seed:
        raise SystemExit(f"benchmarks.ablation: no run of seeds {seeds} is kept in {root} or recorded")
    return payload


if __name__ == "__main__":
    main()
