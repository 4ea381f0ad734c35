"""What bf16 autocast and torch.compile buy on this machine, and what bf16 costs in quality, side by side.

``python -m benchmarks.precision [--quick] [--seeds 0,1,2] [--baseline COMMIT] [--out DIR] [--kept-only]``

Two models on the synthetic default (one process): the 2-layer MiniLM student with every layer trained
(``model.layers=2 model.freeze_layers=0``, the speedup benchmark's model) and the 6-layer teacher with its top two
layers trained (the main job's model; its frozen layers' output is computed once per news and cached).

- Speed: for each model, the variants below train ``--steps`` optimizer steps, interleaved over ``--rounds`` rounds
  (A B C D, A B C D), so a busy moment of the machine falls on all of them alike; per variant the median over
  rounds of training targets per second, real tokens per second (``valid_tokens / wall_seconds``) and the training
  peak resident memory. ``baseline``: the code at ``--baseline`` (default: the commit before this work) in fp32,
  run from a ``git archive`` of it; ``fp32`` and ``bf16``: today's code with ``train.amp=off`` / ``bf16``;
  ``bf16+compile``: with ``train.compile=true``, whose compilation counts in its time (the steady rate after it,
  from the log, is given beside).
- Quality: fp32 and bf16, each trained as the defaults train (``train.epochs`` of the defaults' targets), for each seed: the final dev metrics, the
  bf16 - fp32 AUC difference paired by seed, and its mean. bf16 keeps quality when the mean difference is within
  0.2 AUC points.

Runs are kept in ``--out`` (an interrupted invocation continues), committed runs with the same settings are reused,
and ``--kept-only`` tabulates what has run so far. About 2 hours here (2 cores), most of it the quality epochs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import committed_runs, machine, md_table, run_job_kept, write_results

MODELS = {"student": ["model.encoder=auto", "model.layers=2", "model.freeze_layers=0"],
          "teacher": ["model.encoder=auto"]}
QUICK_MODELS = {"student": ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800"],
                "teacher": ["model.encoder=random:hidden=32,layers=6,heads=2,intermediate=64", "model.vocab_size=800",
                            "model.freeze_layers=4"]}
VARIANTS = {"baseline": [], "fp32": ["train.amp=off"], "bf16": ["train.amp=bf16"],
            "bf16+compile": ["train.amp=bf16", "train.compile=true"]}
BASELINE = "e08337b"  # main before bf16 on CPUs, the host-sync-free step and the step vocabulary
SPEED_LRS = ["train.lr=1e-4", "train.encoder_lr=5e-5"]
QUALITY_BAR = 0.2  # AUC points


def baseline_tree(commit: str, root: Path) -> Path:
    """``commit``'s package laid out for import from PYTHONPATH (engine/ and kernels/ inside speedyrec/, as
    setup.py installs them), from git archive: runs of it measure the code as it was."""
    tree = root / f"tree_{commit}"
    if not (tree / "speedyrec").exists():
        tree.mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parents[1]
        archive = subprocess.run(["git", "archive", commit, "speedyrec", "engine", "kernels"], cwd=repo,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / "engine").rename(tree / "speedyrec" / "engine")
        (tree / "kernels").rename(tree / "speedyrec" / "kernels")
    return tree


def steady_rate(job: dict) -> float | None:
    """The median targets/s of the last half of a run's logged windows (after any compilation)."""
    rates = job.get("log_rates") or []
    return statistics.median(rates[len(rates) // 2:]) if rates else None


def speed_name(model: str, variant: str, r: int, baseline: str) -> str:
    return f"speed_{model}_{variant}{'_' + baseline if variant == 'baseline' else ''}_r{r}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoders, 300 users, few steps")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per speed run (default 40; quick 6)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved speed rounds (default 2; quick 1)")
    p.add_argument("--baseline", default=BASELINE, help="the commit whose fp32 speed is the baseline")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the kept or committed runs")
    p.add_argument("--fresh", action="store_true", help="run again what the committed results hold")
    p.add_argument("--parts", default="speed,quality", help="what may run (the rest is reused or left out)")
    a = p.parse_args(argv)
    parts = set(a.parts.split(","))
    info = machine()
    seeds = [int(s) for s in a.seeds.split(",")]
    models = QUICK_MODELS if a.quick else MODELS
    steps = a.steps or (6 if a.quick else 40)
    rounds = a.rounds or (1 if a.quick else 2)
    data = ["data.synthetic_users=300", "eval.max_impressions=200"] if a.quick else []
    committed = {} if a.quick else committed_runs("precision", a.fresh)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        old = {}
        if not a.kept_only and "speed" in parts:  # run from the archived tree's folder: python -m puts it first
            tree = baseline_tree(a.baseline, root)
            old = {"env": {**os.environ, "PYTHONPATH": str(tree)}, "cwd": tree}
        for r in range(rounds):
            for model, mo in models.items():
                for variant, vo in VARIANTS.items():
                    name = speed_name(model, variant, r, a.baseline)
                    # the base learning rates spelled out: the baseline commit's defaults, which today's -1 (auto)
                    # would make 4x for the student (speed does not depend on them, the settings stay the same)
                    # today's code trains every click, as the baseline commit did (it has no engine.targets), so the
                    # variants' speed is on the same targets
                    same_targets = [] if variant == "baseline" else ["engine.targets=all"]
                    overrides = [*data, *mo, *vo, *SPEED_LRS, f"train.max_steps={steps}", "eval.max_impressions=1",
                                 "train.log_every=5", f"train.seed={r}", *same_targets]
                    job = run_job_kept(name, overrides, root, may_run=not a.kept_only and "speed" in parts,
                                       committed=committed.get(name), ledger="" if a.quick else "precision",
                                       **({**old, "check_defaults": False} if variant == "baseline" else {}))
                    if job is not None and variant == "baseline" and "precision" in job["stats"]:
                        raise SystemExit(f"{name} ran today's code, not {a.baseline}'s")
                    if job is not None:
                        runs[name] = job
        for seed in seeds:
            for model, mo in models.items():
                for variant in ("fp32", "bf16"):
                    name = f"quality_{model}_{variant}_s{seed}"
                    overrides = [*data, *mo, *VARIANTS[variant], f"train.seed={seed}"]
                    job = run_job_kept(name, overrides, root, may_run=not a.kept_only and "quality" in parts,
                                       committed=committed.get(name), ledger="" if a.quick else "precision", timeout=4 * 3600)
                    if job is not None:
                        runs[name] = job
    payload = summarize(runs, models, seeds, rounds, steps, a.baseline)
    payload.update(machine=info, quick=a.quick, runs=runs)
    md = report(payload)
    write_results("precision_quick" if a.quick else "precision", payload, md, lambda path: plot(path, payload))
    print(md)
    return payload


def summarize(runs: dict, models: dict, seeds: list[int], rounds: int, steps: int, baseline: str) -> dict:
    speed: dict[str, dict] = {}
    for model in models:
        for variant in VARIANTS:
            jobs = [runs.get(speed_name(model, variant, r, baseline)) for r in range(rounds)]
            jobs = [j for j in jobs if j is not None]
            if not jobs:
                continue
            st = [j["stats"] for j in jobs]
            speed.setdefault(model, {})[variant] = {
                "targets_per_second": statistics.median(s["clicks_per_second"] for s in st),
                "tokens_per_second": statistics.median(s["valid_tokens"] / s["wall_seconds"] for s in st),
                "train_peak_rss_mb": statistics.median(s["train_peak_rss_mb"] or 0.0 for s in st),
                "steady_targets_per_second": _median([steady_rate(j) for j in jobs]),
                "precision": st[0].get("precision", "float32"), "rounds": len(jobs)}
        base = speed.get(model, {}).get("baseline")
        for v in speed.get(model, {}).values():
            v["over_baseline"] = v["targets_per_second"] / base["targets_per_second"] if base else None
    quality: dict[str, dict] = {}
    for model in models:
        per = {}
        for variant in ("fp32", "bf16"):
            per[variant] = {s: runs[f"quality_{model}_{variant}_s{s}"]["metrics"] for s in seeds
                            if f"quality_{model}_{variant}_s{s}" in runs}
        paired = [100 * (per["bf16"][s]["auc"] - per["fp32"][s]["auc"]) for s in seeds
                  if s in per["bf16"] and s in per["fp32"]]
        if paired:
            quality[model] = {
                "auc": {v: [per[v][s]["auc"] for s in seeds if s in per[v]] for v in per},
                "metrics": per, "seeds": [s for s in seeds if s in per["bf16"] and s in per["fp32"]],
                "commits": {s: runs[f"quality_{model}_bf16_s{s}"].get("commit", "?") for s in seeds
                            if f"quality_{model}_bf16_s{s}" in runs},
                "bf16_minus_fp32_points": paired, "mean_points": statistics.mean(paired),
                "keeps_quality": abs(statistics.mean(paired)) <= QUALITY_BAR}
    return {"speed": speed, "quality": quality, "steps": steps, "rounds": rounds, "baseline": baseline,
            "quality_bar_points": QUALITY_BAR, "models": models}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(d: dict) -> str:
    m = d["machine"]
    lines = ["# bf16 and torch.compile: speed and quality\n",
             f"Device: {m['device']}, torch {m['torch']}, {m['threads']} threads; commit {m.get('commit', '?')}. "
             f"Speed: {d['steps']} optimizer steps per run, {d['rounds']} interleaved round(s), medians; baseline = "
             f"commit {d['baseline']} in fp32. Quality: each run trained as the defaults train (train.epochs), final dev metrics.\n"]
    for model, variants in d["speed"].items():
        rows = [[v, r["precision"], f"{r['targets_per_second']:.1f}",
                 "n/a" if r["steady_targets_per_second"] is None else f"{r['steady_targets_per_second']:.1f}",
                 f"{r['tokens_per_second']:,.0f}", f"{r['train_peak_rss_mb']:.0f}",
                 "n/a" if r["over_baseline"] is None else f"{r['over_baseline']:.2f}x"] for v, r in variants.items()]
        lines += [f"\n**Speed, {model}** (`{' '.join(d['models'][model])}`)\n",
                  md_table(["variant", "precision", "targets/s", "steady targets/s (last half of the log)",
                            "real tokens/s", "training peak MiB", "targets/s vs baseline"], rows)]
    for model, q in d["quality"].items():
        rows = [[s, f"{q['metrics']['fp32'][s]['auc']:.4f}", f"{q['metrics']['bf16'][s]['auc']:.4f}", f"{p:+.2f}",
                 q["commits"].get(s, "?")] for s, p in zip(q["seeds"], q["bf16_minus_fp32_points"])]
        lines += [f"\n**Quality, {model}**: dev AUC at the end of training\n",
                  md_table(["seed", "fp32", "bf16", "bf16 - fp32 (points)", "runs made at commit"], rows),
                  f"\nMean difference {q['mean_points']:+.2f} AUC points over {len(q['seeds'])} seed(s): bf16 "
                  + ("keeps" if q["keeps_quality"] else "does not keep")
                  + f" quality (bar: within {d['quality_bar_points']:.1f} points).\n"]
    return "\n".join(lines)


def plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    models = list(d["speed"])
    fig, ax = plt.subplots(1, max(len(models), 1), figsize=(5 * max(len(models), 1), 3.2), squeeze=False)
    for i, model in enumerate(models):
        variants = d["speed"][model]
        ax[0][i].barh(list(variants), [v["targets_per_second"] for v in variants.values()], color="tab:blue")
        ax[0][i].set_xlabel("training targets per second")
        ax[0][i].set_title(model, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
