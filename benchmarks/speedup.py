"""Speedup of the SpeedyFeed workflow over the typical workflow, as time to quality, measured in one run.

The synthetic default data, the 2-layer MiniLM student (all layers trained), one process, the precision
``train.amp=auto`` resolves (bf16 on a CPU with native bf16). The comparison is set up so that neither workflow is
favoured:

- the learning rate of each workflow is chosen by the same sweep (multiples of the defaults, ``--lrs``, grown by
  a factor 4 past an edge where the best lies, at most twice: sweep_choice) at the same
  number of optimizer steps (``--sweep-steps``, >= 200), each a short run with the default schedule (a linear decay
  over those steps), scored by the best 3-evaluation running mean of its dev AUC;
- each workflow then trains at its chosen learning rate, with the default schedule planned over ``epochs`` of the log,
  until its dev AUC plateaus (``eval.patience`` evaluations without a new best) or the plan ends, for each seed;
- times are read from a running mean of 3 consecutive evaluations (one lucky evaluation of a noisy curve decides
  nothing): per seed, the target is the typical workflow's best running mean, and each workflow's time is the
  first time its running mean reaches it; the headline is the median over seeds of typical / speedyfeed, with the
  range.

Two speedyfeed arms. ``speedyfeed``: every click of a user's sequence a target (``engine.targets=all``, SpeedyFeed's
autoregressive loss; history clicks, which have no impression, get random negatives). ``speedyfeed_impressions``,
stated before it ran, once the first arm's runs had shown that most of its targets are history clicks: the typical
workflow's targets, the impression clicks against their impressions' non-clicked news
(``engine.targets=impressions``), its learning rate from the same sweep and rule, timed against the same typical
runs. It measured better and is the default (``engine.targets=auto``), so the headline (the top-level keys of
speedup.json) is its; the every-click arm's figures are under ``all_click_targets``.

Beside it: (a) cost per training target (targets/s; the workflows' targets differ) and on identical targets
(the typical workflow trained on every click of the user sequences); (b) time for one epoch of the same log, at the
measured rates: when both workflows need the same epochs to reach a quality, this ratio bounds the time-to-quality
speedup, so the headline says how close it comes; (d) dev AUC at equal training time and each workflow's best.
Then ``engine.negatives`` 1 against 4 and a smaller token budget (the seed-0 speedyfeed run with that one setting
changed, over its first ``negatives_cap`` seconds), and the cumulative ablation (typical -> + centralized encoding
and dynamic batching -> + cache -> + autoregressive loss [-> + BusLM]) in targets/s, titles only and long text.

    python -m benchmarks.speedup [--quick] [--out DIR] [--lrs 1,4,16] [--seeds 0,1,2] [--users N] [--kept-only]

``--out`` keeps every run (``DIR/<run>/job.json``); a second call with the same ``--out`` reuses the runs
already finished, so an interrupted benchmark continues. Each finished run is also recorded in
results/ledger/speedup.json: committed, it lets the next session continue without the run folders. The
data size (``users``) is chosen so that the whole benchmark takes about six hours here (2 cores): see FULL.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import committed_runs, machine, md_table, run_job_kept, write_results
from speedyrec.config import BASE_ENCODER_LR, BASE_LR, Config, load_config

STUDENT = ["model.encoder=auto", "model.layers=2", "model.freeze_layers=0"]
TINY = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800"]
LONG_TEXT = ["data.title_tokens=32", "data.abstract_tokens=64", "data.body_tokens=128"]
WORKFLOWS = ("typical", "speedyfeed")
# A third arm: the speedyfeed workflow trained on the typical workflow's targets, the impression clicks with their
# impressions' non-clicked news (engine.targets=impressions; history clicks are context). Stated before it ran:
# the default arm's runs had shown that 87.5% of its targets are history clicks with random negatives while dev
# ranks impressions' candidates. Same sweep, same rule, same patience and evaluation interval as the default arm;
# its plan is the typical workflow's number of epochs (the same targets).
IMPRESSIONS = "speedyfeed_impressions"
ARM_OVERRIDES = {"typical": ["train.workflow=typical"], "speedyfeed": ["train.workflow=speedyfeed", "engine.targets=all"],
                 IMPRESSIONS: ["train.workflow=speedyfeed", "engine.targets=impressions"]}
HEADLINE_ARM = IMPRESSIONS  # the arm the defaults train (engine.targets=auto)
SMOOTH = 3  # evaluations in the running mean that times are read from
EXTEND = 2  # times the learning-rate grid may grow past an edge (sweep_choice)

# full mode / quick mode (a tiny random encoder on 300 users: checks the harness, says nothing about speed).
# Full mode's size: 1,000 users, so that 3 seeds of the typical workflow trained to its plateau, the sweep and the
# other tables take about six hours on 2 cores (the typical workflow trains ~7 targets/s in bf16 here).
# The sweep's grid: x1 and x4 left both workflows' best at x4, the grid's edge (typical's dev AUC still rising at its
# 200th step), so x16 was added for both; where a best still lies at an edge, sweep_choice grows that workflow's grid.
FULL = {"users": 1000, "model": STUDENT, "lrs": (1.0, 4.0, 16.0), "sweep_steps": 200, "sweep_every": 25,
        "every": {"typical": 60.0, "speedyfeed": 20.0, IMPRESSIONS: 20.0},
        "patience": {"typical": 6, "speedyfeed": 10, IMPRESSIONS: 10},
        "epochs": {"typical": 5, "speedyfeed": 6, IMPRESSIONS: 5}, "seeds": [0, 1, 2], "negatives_cap": 240.0, "ablation_steps": 10,
        "budgets": [5000], "typical_ablation_steps": 3, "eval": []}
QUICK = {"users": 300, "model": TINY, "lrs": (1.0, 4.0), "sweep_steps": 12, "sweep_every": 4,
         "every": {"typical": 5.0, "speedyfeed": 2.0, IMPRESSIONS: 2.0},
         "patience": {"typical": 3, "speedyfeed": 3, IMPRESSIONS: 3}, "epochs": {"typical": 1, "speedyfeed": 2, IMPRESSIONS: 1},
         "seeds": [0, 1],
         "negatives_cap": 8.0, "ablation_steps": 3, "budgets": [4000], "typical_ablation_steps": 2,
         "eval": ["eval.max_impressions=200"]}


def default_negatives() -> int:
    """engine.negatives of a default finetune run (``auto`` resolved)."""
    return load_config(overrides=["stage=finetune"]).engine.negatives


def lr_overrides(mult: float) -> list[str]:
    """Learning rates ``mult`` times the base rates (train.lr=-1 resolves to x4 of them for speedyfeed finetuning)."""
    return [f"train.lr={BASE_LR * mult:g}", f"train.encoder_lr={BASE_ENCODER_LR * mult:g}"]


def sweep_choice(score_of, grid, extend: int = EXTEND) -> tuple[float | None, list[float]]:
    """One workflow's learning-rate multiple: the best score (best running mean of SMOOTH dev evaluations) over
    ``grid``; when the best is the grid's largest (smallest) multiple, the grid grows by a factor 4 that way, at
    most ``extend`` times, so the choice is not an edge the grid happened to stop at. The same rule for both
    workflows. ``score_of(m)``: the score of multiple m, None when its run is missing -> (None, the multiples
    needed so far). Returns (chosen multiple, the multiples swept)."""
    mults = sorted(float(m) for m in grid)
    scores: dict[float, float | None] = {}
    for left in range(extend, -1, -1):
        scores.update({m: score_of(m) for m in mults if m not in scores})  # each multiple scored once
        if any(scores[m] is None for m in mults):
            return None, mults
        best = max(mults, key=lambda m: scores[m])
        if left and best == mults[-1]:
            mults.append(best * 4)
        elif left and best == mults[0] and len(mults) > 1:
            mults.insert(0, best / 4)
        else:
            return best, mults
    return best, mults


def chosen_multiples(quick: bool = False) -> dict | None:
    """The learning-rate multiples this benchmark's sweep chose for the typical workflow and for speedyfeed as its
    defaults train (HEADLINE_ARM), keyed "typical" / "speedyfeed": from its results file, or, while the headline is
    still running across sessions, from the sweep runs in its ledger; None before the sweep has run."""
    from benchmarks.common import RESULTS, ledger_runs

    path = RESULTS / ("speedup_quick.json" if quick else "speedup.json")
    done = json.loads(path.read_text()) if path.exists() else {}
    arms = {"typical": "typical", "speedyfeed": done.get("headline_arm", HEADLINE_ARM)}
    if "lr_sweep_steps" in done and arms["speedyfeed"] in done["best_lr_multiple"]:
        return {k: float(done["best_lr_multiple"][arm]) for k, arm in arms.items()}
    mode = QUICK if quick else FULL
    runs, steps = ({} if quick else ledger_runs("speedup")), mode["sweep_steps"]

    def score_of(arm):
        return lambda m: best_smoothed(runs[n]) if (n := f"{arm}_lr{m:g}_steps{steps}") in runs else None

    chosen = {k: sweep_choice(score_of(arm), mode["lrs"])[0] for k, arm in arms.items()}
    return None if None in chosen.values() else chosen


def best_auc(job: dict) -> float:
    return max(p["auc"] for p in job["curve"])


def seconds_to(job: dict, target: float) -> float | None:
    """Training seconds at the first dev evaluation with AUC >= target (None: never reached)."""
    for p in job["curve"]:
        if p["auc"] >= target:
            return p["train_seconds"]
    return None


def smoothed(job: dict, k: int = SMOOTH) -> list[tuple[float, float]]:
    """(training seconds, mean AUC of this and the k - 1 evaluations before it), from the k-th evaluation on."""
    c = job["curve"]
    return [(c[i]["train_seconds"], statistics.mean(p["auc"] for p in c[i - k + 1 : i + 1])) for i in range(k - 1, len(c))]


def best_smoothed(job: dict, k: int = SMOOTH) -> float | None:
    sm = smoothed(job, k)
    return max(a for _, a in sm) if sm else None


def smoothed_seconds_to(job: dict, target: float, k: int = SMOOTH) -> float | None:
    """Training seconds at the first evaluation whose running mean of k reaches ``target`` (None: never)."""
    for t, a in smoothed(job, k):
        if a >= target - 1e-12:
            return t
    return None


def target_auc(quick: bool, results: Path) -> float | None:
    """The typical workflow's best dev AUC in this benchmark's results (same mode) in ``results``: the quality
    level the other benchmarks time their runs to."""
    path = results / ("speedup_quick.json" if quick else "speedup.json")
    return json.loads(path.read_text())["target_auc"] if path.exists() else None


def auc_at(job: dict, seconds: float) -> float | None:
    """Dev AUC of the last evaluation made within ``seconds`` of training."""
    within = [p for p in job["curve"] if p["train_seconds"] <= seconds + 1e-6]
    return within[-1]["auc"] if within else None


def rate(job: dict) -> float:
    return job["stats"]["clicks_per_second"]


def seed_comparison(typ: dict, sf: dict) -> dict:
    """One seed's pair of runs, timed to the typical run's best running mean (and, for reference, to its best single
    evaluation as the earlier headline read it)."""
    target = best_smoothed(typ)
    t_typ, t_sf = smoothed_seconds_to(typ, target), smoothed_seconds_to(sf, target)
    raw = best_auc(typ)
    r_typ, r_sf = seconds_to(typ, raw), seconds_to(sf, raw)
    return {"target_auc": target, "seconds_to_target": {"typical": t_typ, "speedyfeed": t_sf},
            "speedup": t_typ / t_sf if t_sf else None,
            "raw": {"target_auc": raw, "typical": r_typ, "speedyfeed": r_sf, "speedup": r_typ / r_sf if r_sf else None},
            "best_smoothed": {"typical": target, "speedyfeed": best_smoothed(sf)},
            "best_at_fraction": {wf: _best_point(j)["train_seconds"] / j["curve"][-1]["train_seconds"]
                                 for wf, j in (("typical", typ), ("speedyfeed", sf))},
            "stopped_by": {wf: _stop_reason(j) for wf, j in (("typical", typ), ("speedyfeed", sf))}}


def arm_summary(heads: dict, arm: str) -> dict:
    """The time-to-quality figures of one arm against the typical workflow over the seeds' headline runs
    (``heads``: seed -> arm -> job), keyed "typical" / "speedyfeed" (the arm) whichever the arm is."""
    seeds = {str(seed): seed_comparison(h["typical"], h[arm]) for seed, h in heads.items()}
    reached = [c["speedup"] for c in seeds.values() if c["speedup"] is not None]
    raw = [c["raw"]["speedup"] for c in seeds.values() if c["raw"]["speedup"] is not None]
    pair = {"typical": "typical", "speedyfeed": arm}
    rates = {k: statistics.median(rate(h[wf]) for h in heads.values()) for k, wf in pair.items()}
    first = heads[next(iter(heads))]
    epoch = {k: first[wf]["stats"]["clicks_in_data"] / rates[k] for k, wf in pair.items()}
    epoch_speedup = epoch["typical"] / epoch["speedyfeed"]
    head = statistics.median(reached) if reached else None
    equal = {}
    for seed, h in heads.items():
        t_eq = min(h["typical"]["curve"][-1]["train_seconds"], h[arm]["curve"][-1]["train_seconds"])
        equal[str(seed)] = {"seconds": t_eq, "typical": auc_at(h["typical"], t_eq), "speedyfeed": auc_at(h[arm], t_eq)}
    return {"time_to_auc_speedup_smoothed": head,
            "time_to_auc_speedup_seeds": [seeds[str(s)]["speedup"] for s in heads],
            "time_to_auc_speedup_range": [min(reached), max(reached)] if reached else None,
            "time_to_auc_speedup_raw_median": statistics.median(raw) if raw else None,
            "epoch_speedup": epoch_speedup, "fraction_of_epoch_bound": head / epoch_speedup if head else None,
            "per_target_speedup": rates["speedyfeed"] / rates["typical"], "targets_per_second": rates,
            "epoch_seconds": epoch, "seeds": seeds, "auc_at_equal_time": equal,
            "best_auc": {k: statistics.median(c["best_smoothed"][k] for c in seeds.values()) for k in pair}}


def _stop_reason(job: dict) -> str:
    s = job["stats"]
    return "the plan's end" if s["clicks_not_reached"] == 0 else "patience"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="benchmarks.speedup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users: checks the harness")
    ap.add_argument("--out", default="", help="keep the runs here and reuse finished ones (default: a temporary folder)")
    ap.add_argument("--lrs", default="", help="learning-rate multiples of the defaults, swept for both workflows "
                    "(default: the mode's, 1,4,16; quick 1,4)")
    ap.add_argument("--seeds", default="", help="seeds of the headline runs (default 0,1,2)")
    ap.add_argument("--users", type=int, default=0, help="synthetic users (default: FULL's)")
    ap.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or committed")
    ap.add_argument("--fresh", action="store_true", help="run again what the committed results hold")
    ap.add_argument("--sweep-only", action="store_true", help="run the learning-rate sweep, print its choice and stop "
                    "(a long benchmark split into parts; the ledger keeps the runs)")
    a = ap.parse_args(argv)
    mode = dict(QUICK if a.quick else FULL)
    if a.users:
        mode["users"] = a.users
    if a.seeds:
        mode["seeds"] = [int(x) for x in a.seeds.split(",")]
    mults = [float(m) for m in a.lrs.split(",")] if a.lrs else list(mode["lrs"])
    base = [f"data.synthetic_users={mode['users']}", *mode["model"], *mode["eval"]]
    info = machine()
    committed = {} if a.quick else committed_runs("speedup", a.fresh)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)

        def kept(name, overrides, timeout=6 * 3600):
            job = run_job_kept(name, overrides, root, may_run=not a.kept_only, committed=committed.get(name),
                               timeout=timeout, ledger="" if a.quick else "speedup")
            if job is None:
                raise SystemExit(f"{name} has not run yet: run without --kept-only first")
            return job

        # the sweep: every learning rate of both workflows for the same number of optimizer steps
        steps = mode["sweep_steps"]
        sweep: dict[str, dict[float, dict]] = {wf: {} for wf in ARM_OVERRIDES}

        def swept(wf):  # runs multiple m of the sweep for workflow wf (or reuses it) -> its score
            def score_of(m):
                sweep[wf][m] = kept(f"{wf}_lr{m:g}_steps{steps}",
                                    base + [*ARM_OVERRIDES[wf], *lr_overrides(m), f"train.max_steps={steps}",
                                            "train.epochs=100", f"eval.every={mode['sweep_every']}"])
                return best_smoothed(sweep[wf][m])
            return score_of

        best_mult = {wf: sweep_choice(swept(wf), mults)[0] for wf in WORKFLOWS}
        score = {wf: {m: best_smoothed(j) for m, j in sorted(sweep[wf].items())} for wf in WORKFLOWS}
        sf_mult = best_mult["speedyfeed"]
        if a.sweep_only:
            print(f"the sweep's scores (best running mean of {SMOOTH}): {score}; chosen: {best_mult}")
            return {"lr_sweep_scores": score, "best_lr_multiple": best_mult}

        def planned(wf, seed):  # the chosen rate, the default schedule over the plan, stopped at the plateau
            return base + [*ARM_OVERRIDES[wf], *lr_overrides(best_mult[wf]), f"train.epochs={mode['epochs'][wf]}",
                           f"eval.every_seconds={mode['every'][wf]:g}", f"eval.patience={mode['patience'][wf]}",
                           f"train.seed={seed}"]

        heads = {seed: {wf: kept(f"{wf}_lr{best_mult[wf]:g}_seed{seed}", planned(wf, seed)) for wf in WORKFLOWS}
                 for seed in mode["seeds"]}
        first = heads[mode["seeds"][0]]
        sf = first["speedyfeed"]
        # (a) on identical targets: the typical workflow trained on every click of the user sequences
        typ_seq = kept("typical_sequence_targets",
                       base + [f"train.max_steps={mode['typical_ablation_steps']}", "eval.max_impressions=1",
                               "train.workflow=typical", "train.typical_targets=sequence",
                               *lr_overrides(best_mult["typical"])])
        # seed 0's speedyfeed run with one setting changed, over its first negatives_cap seconds (same schedule)

        def capped_run(name, extra):
            return kept(name, [*planned("speedyfeed", mode["seeds"][0]), f"train.max_seconds={mode['negatives_cap']:g}",
                               extra])

        neg_default = default_negatives()
        neg_other_n = 1 if neg_default != 1 else 4
        neg_other = capped_run(f"speedyfeed_negatives{neg_other_n}", f"engine.negatives={neg_other_n}")
        ablation = {}
        for text, fields in (("titles", []), ("long text", LONG_TEXT)):
            # the typical workflow's batch of 32 clicks x 55 news of long text does not fit in 24 GiB: 8 clicks there
            typical = ["train.workflow=typical"] + (["train.batch_size=8"] if fields else [])
            stages = [("typical" + (" (8 clicks per batch)" if fields else ""), typical, mode["typical_ablation_steps"]),
                      ("+ centralized encoding, dynamic batching",
                       ["train.workflow=speedyfeed", "engine.cache=false", "engine.autoregressive=false"], None),
                      ("+ cache", ["train.workflow=speedyfeed", "engine.autoregressive=false"], None),
                      ("+ autoregressive loss", ["train.workflow=speedyfeed"], None)]
            if fields:
                stages.append(("+ BusLM", ["train.workflow=speedyfeed", "engine.buslm=true"], None))
            rows = []
            for label, extra, n in stages:
                name = f"ablation_{text.replace(' ', '_')}_{len(rows)}"
                extra = [*extra, "engine.targets=all"] if "train.workflow=speedyfeed" in extra else extra
                rows.append((label, kept(name, base + [f"train.max_steps={n or mode['ablation_steps']}",
                                                       "eval.max_impressions=1", *fields, *extra, *lr_overrides(sf_mult)])))
            ablation[text] = rows
        budgets = {b: capped_run(f"speedyfeed_budget{b}", f"engine.token_budget={b}") for b in mode.get("budgets", [])}
        # the impression-targets arm: its own sweep by the same rule, then its headline runs
        best_mult[IMPRESSIONS] = sweep_choice(swept(IMPRESSIONS), mults)[0]
        score[IMPRESSIONS] = {m: best_smoothed(j) for m, j in sorted(sweep[IMPRESSIONS].items())}
        for seed in mode["seeds"]:
            heads[seed][IMPRESSIONS] = kept(f"{IMPRESSIONS}_lr{best_mult[IMPRESSIONS]:g}_seed{seed}",
                                            planned(IMPRESSIONS, seed))

    summary = arm_summary(heads, HEADLINE_ARM)
    every_click = arm_summary(heads, "speedyfeed")
    seeds, epoch_speedup, smoothed_head = summary["seeds"], summary["epoch_speedup"], summary["time_to_auc_speedup_smoothed"]
    reached = [x for x in summary["time_to_auc_speedup_seeds"] if x is not None]
    payload = {
        "machine": info, "quick": a.quick, "mode": {k: v for k, v in mode.items()}, "lr_multiples": mults,
        "lr_multiples_swept": {wf: sorted(sweep[wf]) for wf in sweep},
        "lr_sweep_steps": steps, "lr_sweep_scores": {wf: {f"{m:g}": v for m, v in sc.items()} for wf, sc in score.items()},
        "best_lr_multiple": best_mult, "headline_arm": HEADLINE_ARM, "headline_lr_multiple": best_mult[HEADLINE_ARM],
        **summary,
        # the quality level other benchmarks time their runs to: the median over seeds of typical's best running mean
        "target_auc": statistics.median(c["target_auc"] for c in seeds.values()),
        # the same figures for every click a target (its "speedyfeed" keys are that arm), and its cost per target
        # against the typical workflow trained on the same targets
        "all_click_targets": {"lr_multiple": sf_mult, **every_click,
                              "per_target_speedup_same_targets": every_click["targets_per_second"]["speedyfeed"]
                              / rate(typ_seq)},
        "default_negatives": neg_default,
        "negatives": {str(neg_default): _window_summary(sf, mode["negatives_cap"], seeds[str(mode["seeds"][0])]["target_auc"]),
                      str(neg_other_n): _window_summary(neg_other, mode["negatives_cap"],
                                                        seeds[str(mode["seeds"][0])]["target_auc"])},
        "runs": {f"{wf}_lr{m:g}_steps{steps}": sweep[wf][m] for wf in sweep for m in sorted(sweep[wf])},
        "headline_runs": {f"{wf}_seed{seed}": h[wf] for seed, h in heads.items() for wf in h},
        "typical_sequence_targets": typ_seq, f"speedyfeed_negatives{neg_other_n}": neg_other,
        "token_budgets": {"default": Config().engine.token_budget,
                          **{str(b): {**_window_summary(j, mode["negatives_cap"], seeds[str(mode["seeds"][0])]["target_auc"]),
                                      "steps": j["stats"]["steps"]} for b, j in budgets.items()}},
        "speedyfeed_budgets": {str(b): j for b, j in budgets.items()},
        "ablation": {text: [{"variant": label, **job} for label, job in rows] for text, rows in ablation.items()},
    }
    md = report(payload, typ_seq, ablation)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(12, 4))
        for wf, color in (("typical", "grey"), ("speedyfeed", "tab:blue"), (IMPRESSIONS, "tab:green")):
            for i, (seed, h) in enumerate(heads.items()):
                sm = smoothed(h[wf])
                ax[0].plot([max(t, 1.0) for t, _ in sm], [v for _, v in sm], color=color, lw=1.0,
                           label=f"{wf}, lr x{best_mult[wf]:g} (running mean of {SMOOTH})" if i == 0 else None)
        for seed, c in seeds.items():
            ax[0].axhline(c["target_auc"], color="tab:red", lw=0.6, ls=":")
        ax[0].set_xscale("log")
        ax[0].set_xlabel("training seconds (log)")
        ax[0].set_ylabel("dev AUC")
        ax[0].legend(fontsize=7)
        labels, values = [], []
        for text, rows in ablation.items():
            for label, job in rows:
                labels.append(f"{text}: {label}")
                values.append(rate(job))
        ax[1].barh(labels, values, color=["grey" if "typical" in lab else "tab:blue" for lab in labels])
        ax[1].set_xscale("log")
        ax[1].set_xlabel("training targets / second (log)")
        ax[1].invert_yaxis()
        ax[1].tick_params(axis="y", labelsize=7)
        fig.suptitle(f"time to the typical workflow's best (running mean of {SMOOTH}): "
                     f"{'%.1fx sooner, median of %d seeds' % (smoothed_head, len(reached)) if smoothed_head else 'not reached'}"
                     f" (bound: {epoch_speedup:.1f}x per epoch; {info['device']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    # the ledger stays: speedup.json keeps the sweep's runs by name but the others under their roles, and a later
    # invocation (another arm, another seed) reuses every finished run from the ledger
    write_results("speedup_quick" if a.quick else "speedup", payload, md, plot)
    print(md)
    return payload


def _best_point(job: dict) -> dict:
    return max(job["curve"], key=lambda p: p["auc"])


def _window_summary(job: dict, cap: float, target: float) -> dict:
    """A curve run over its first ``cap`` training seconds: rate, best and last AUC, time to the target within them
    (None when the run reached it only later: the default's run is the full headline run, the others stop at cap)."""
    within = [p["auc"] for p in job["curve"] if p["train_seconds"] <= cap + 1e-6]
    t = seconds_to(job, target)
    return {"targets_per_second": rate(job), "best_auc_within_cap": max(within) if within else None,
            "auc_at_cap": auc_at(job, cap), "seconds_to_target": t if t is not None and t <= cap + 1e-6 else None}


def _f(x, fmt="{:.4f}", none="not reached"):
    return none if x is None else fmt.format(x)


ARM_WORDS = {IMPRESSIONS: "speedyfeed (its defaults: impression targets)",
             "speedyfeed": "speedyfeed with every click a target (engine.targets=all)"}


def headline_sentence(d: dict, arm: str = "") -> str:
    """The headline as the README and speedup.md state it: smoothed, over seeds, beside its bound; for the arm
    the defaults train (the top-level keys), or (arm="speedyfeed") every click a target (``all_click_targets``)."""
    arm = arm or d.get("headline_arm", "speedyfeed")
    a = d if arm == d.get("headline_arm", "speedyfeed") else d["all_click_targets"]
    who = ARM_WORDS[arm]
    head, rng, n = a["time_to_auc_speedup_smoothed"], a["time_to_auc_speedup_range"], len(d["mode"]["seeds"])
    if head is None:
        return (f"{who} did not reach the typical workflow's best running mean (read from a running mean of {SMOOTH} "
                f"evaluations) in any of {n} seeds: its best running mean, median over seeds, is "
                f"{a['best_auc']['speedyfeed']:.4f} against typical's {a['best_auc']['typical']:.4f}; one epoch of the "
                f"same log takes {a['epoch_speedup']:.1f}x less time")
    reached = sum(x is not None for x in a["time_to_auc_speedup_seeds"])
    return (f"{who} reaches the typical workflow's best dev AUC (read from a running mean of {SMOOTH} evaluations) "
            f"**{head:.1f}x sooner** (median of {reached} of {n} seeds; range {rng[0]:.1f}x to {rng[1]:.1f}x), against "
            f"{a['epoch_speedup']:.1f}x for one epoch of the same log, the bound when both workflows need the same "
            f"epochs to get there: {a['fraction_of_epoch_bound']:.0%} of it")


def report(d, typ_seq, ablation) -> str:
    info, mode = d["machine"], d["mode"]
    seeds = d["seeds"]
    md = ["# Speedup: speedyfeed vs the typical workflow, as time to quality\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads, one process; commit "
          f"{info.get('commit', '?')}. Data: synthetic default, {mode['users']} users. Model: {' '.join(mode['model'])}, "
          f"precision {d['headline_runs'][next(iter(d['headline_runs']))]['stats'].get('precision', 'float32')}. "
          f"Learning rates swept for both workflows at {d['lr_sweep_steps']} optimizer steps each "
          f"({', '.join('x%g' % m for m in d['lr_multiples'])} the defaults, a linear decay over the steps, scored by "
          f"the best running mean of {SMOOTH} dev evaluations made every {mode['sweep_every']} steps): typical "
          f"x{d['best_lr_multiple']['typical']:g}, speedyfeed x{d['headline_lr_multiple']:g} (its defaults: "
          f"impression targets; every click a target: x{d['all_click_targets']['lr_multiple']:g}). Headline runs: "
          f"each workflow at its rate, the default schedule planned over {mode['epochs']['typical']} (typical) / "
          f"{mode['epochs'][d['headline_arm']]} (speedyfeed) epochs of the log, dev AUC every {mode['every']['typical']:g} s / "
          f"{mode['every'][d['headline_arm']]:g} s of training, stopped after {mode['patience']['typical']} / "
          f"{mode['patience'][d['headline_arm']]} evaluations without a new best, seeds "
          f"{', '.join(map(str, mode['seeds']))}. Times are training-loop seconds (data preparation and evaluation "
          "excluded).\n",
          f"\n{headline_sentence(d)}.\n",
          "\n## Per seed\n\n",
          md_table(["seed", "target: typical's best running mean", "typical reaches it", "speedyfeed reaches it",
                    "speedup", "single-evaluation reading (earlier headline)", "typical stopped by",
                    "typical's best at", "speedyfeed's best running mean"],
                   [[s, f"{c['target_auc']:.4f}", _f(c["seconds_to_target"]["typical"], "{:.0f} s"),
                     _f(c["seconds_to_target"]["speedyfeed"], "{:.0f} s"), _f(c["speedup"], "{:.1f}x"),
                     _f(c["raw"]["speedup"], "{:.1f}x") + f" (to {c['raw']['target_auc']:.4f})",
                     c["stopped_by"]["typical"], f"{c['best_at_fraction']['typical']:.0%} of its run",
                     _f(c["best_smoothed"]["speedyfeed"])] for s, c in seeds.items()]),
          "\n## The four figures\n\n",
          md_table(["figure", "what it counts", "typical", "speedyfeed", "speedyfeed / typical"], [
              ["(c) time to quality", "median over seeds of the seconds to the typical workflow's best running mean",
               _f(statistics.median([c["seconds_to_target"]["typical"] for c in seeds.values()]), "{:.0f} s"),
               _f(_median([c["seconds_to_target"]["speedyfeed"] for c in seeds.values()]), "{:.0f} s"),
               _f(d["time_to_auc_speedup_smoothed"], "{:.1f}x")],
              ["(a) cost per target", "training targets per second, median of the headline runs (both: the "
               "impressions' clicks, each against 4 of its impression's non-clicked news)",
               f"{d['targets_per_second']['typical']:.1f}", f"{d['targets_per_second']['speedyfeed']:.1f}",
               f"{d['per_target_speedup']:.1f}x"],
              ["(b) one epoch: the bound", "seconds for one epoch of the same log, at the measured rates",
               f"{d['epoch_seconds']['typical']:.0f} s", f"{d['epoch_seconds']['speedyfeed']:.0f} s", f"{d['epoch_speedup']:.1f}x"],
              ["(d) AUC at equal time", "dev AUC when the shorter run of a seed ended, median over seeds",
               _f(_median([e["typical"] for e in d["auc_at_equal_time"].values()]), none="n/a"),
               _f(_median([e["speedyfeed"] for e in d["auc_at_equal_time"].values()]), none="n/a"), ""],
              ["(d') best AUC", "best running mean of the headline runs, median over seeds",
               f"{d['best_auc']['typical']:.4f}", f"{d['best_auc']['speedyfeed']:.4f}",
               f"{(d['best_auc']['speedyfeed'] - d['best_auc']['typical']) * 100:+.2f} points"]]),
          all_click_section(d, typ_seq),
          "\n## The learning-rate sweep and the headline runs\n\n"]
    rows = []
    for name, job in {**d["runs"], **d["headline_runs"]}.items():
        st = job["stats"]
        best = _best_point(job)
        rows.append([name, f"{st['wall_seconds']:.0f}", f"{st['steps']}", f"{st['clicks_trained']:,.0f}",
                     f"{st['clicks_trained'] / st['clicks_in_data']:.2f}", f"{rate(job):.1f}", f"{st['data_efficiency']:.1%}",
                     f"{best['auc']:.4f} at {best['train_seconds']:.0f} s", _f(best_smoothed(job))])
    md.append(md_table(["run", "train s", "steps", "targets", "epochs", "targets/s", "data efficiency", "best dev AUC",
                        f"best running mean of {SMOOTH}"], rows))
    neg_default = str(d["default_negatives"])
    n_def = d["negatives"][neg_default]
    every = d["all_click_targets"]
    md += [f"\n## Negatives per click (speedyfeed, every click a target, lr x{every['lr_multiple']:g}, seed {mode['seeds'][0]}, first "
           f"{mode['negatives_cap']:g} s)\n\n",
           md_table(["engine.negatives", "targets/s", "best dev AUC within the time", "to typical's best within the time"],
                    [[k + (" (default)" if k == neg_default else ""), f"{v['targets_per_second']:.1f}",
                      _f(v["best_auc_within_cap"]), _f(v["seconds_to_target"], "{:.0f} s")]
                     for k, v in sorted(d["negatives"].items())])]
    tb = d.get("token_budgets", {})
    if len(tb) > 1:
        first = d["headline_runs"][f"speedyfeed_seed{mode['seeds'][0]}"]

        def steps_in(job):  # optimizer steps at the last evaluation within the time
            return max((p["step"] for p in job["curve"] if p["train_seconds"] <= mode["negatives_cap"] + 1e-6), default=0)

        rows = [[f"{tb['default']} (default)", steps_in(first), f"{n_def['targets_per_second']:.1f}",
                 _f(n_def["best_auc_within_cap"]), _f(n_def["seconds_to_target"], "{:.0f} s")]]
        rows += [[b, steps_in(d["speedyfeed_budgets"][b]), f"{v['targets_per_second']:.1f}", _f(v["best_auc_within_cap"]),
                  _f(v["seconds_to_target"], "{:.0f} s")] for b, v in tb.items() if b != "default"]
        md += [f"\n## Token budget per step (speedyfeed, every click a target, lr x{every['lr_multiple']:g}, first {mode['negatives_cap']:g} s)\n\n",
               md_table(["engine.token_budget", "steps in the time", "targets/s", "best dev AUC within the time",
                         "to typical's best within the time"], rows)]
    for text, rows in ablation.items():
        base_rate = rate(rows[0][1])
        md += [f"\n## Cumulative ablation, {text} ({mode['ablation_steps']} steps each; typical {mode['typical_ablation_steps']})\n\n",
               md_table(["variant", "targets/s", "vs typical", "data efficiency", "news encoded per target", "cache hit rate"],
                        [[label, f"{rate(j):.1f}", f"{rate(j) / base_rate:.1f}x", f"{j['stats']['data_efficiency']:.1%}",
                          f"{j['stats']['news_encoded'] / max(j['stats']['clicks_trained'], 1):.2f}",
                          f"{j['stats']['cache_hits'] / max(j['stats']['cache_lookups'], 1):.1%}"] for label, j in rows])]
    md.append("\nThe cache serves a row with probability 1 - exp(-beta t) at step t, so in these short runs it is barely "
              "on; its hit rate over whole runs is in the headline runs (`headline_runs` in speedup.json).\n")
    return "".join(md)


def all_click_section(d: dict, typ_seq: dict) -> str:
    """Speedyfeed with every click a target (engine.targets=all, the paper's loss), timed against the same typical
    runs."""
    a, mode = d["all_click_targets"], d["mode"]
    seeds = a["seeds"]
    return "".join([
        f"\n## Every click a target (engine.targets=all, SpeedyFeed's loss; lr x{a['lr_multiple']:g})\n\n"
        "Every click of a user's sequence is a target; in this log most of them are history clicks, which have no "
        "impression and are trained against random news, while dev ranks an impression's candidates. Its learning "
        f"rate comes from the same sweep and rule, its plan is {mode['epochs']['speedyfeed']} epochs, dev AUC every "
        f"{mode['every']['speedyfeed']:g} s, patience {mode['patience']['speedyfeed']}; the typical runs are the "
        "same. The ablations, negatives and token-budget runs below are of this arm.\n\n",
        f"{headline_sentence(d, 'speedyfeed')}.\n\n",
        md_table(["seed", "target: typical's best running mean", "typical reaches it", "this arm reaches it", "speedup",
                  "this arm stopped by", "this arm's best running mean"],
                 [[s, f"{c['target_auc']:.4f}", _f(c["seconds_to_target"]["typical"], "{:.0f} s"),
                   _f(c["seconds_to_target"]["speedyfeed"], "{:.0f} s"), _f(c["speedup"], "{:.1f}x"),
                   c["stopped_by"]["speedyfeed"], _f(c["best_smoothed"]["speedyfeed"])] for s, c in seeds.items()]),
        "\n",
        md_table(["figure", "typical", "this arm", "this arm / typical"], [
            ["(a) training targets per second (each its own targets)", f"{a['targets_per_second']['typical']:.1f}",
             f"{a['targets_per_second']['speedyfeed']:.1f}", f"{a['per_target_speedup']:.1f}x"],
            ["(a') the same targets (typical trained on every click: train.typical_targets=sequence)",
             f"{rate(typ_seq):.1f}", f"{a['targets_per_second']['speedyfeed']:.1f}",
             f"{a['per_target_speedup_same_targets']:.1f}x"],
            ["(b) one epoch: the bound", f"{a['epoch_seconds']['typical']:.0f} s", f"{a['epoch_seconds']['speedyfeed']:.0f} s",
             f"{a['epoch_speedup']:.1f}x"],
            ["(d') best running mean, median over seeds", f"{a['best_auc']['typical']:.4f}",
             f"{a['best_auc']['speedyfeed']:.4f}",
             f"{(a['best_auc']['speedyfeed'] - a['best_auc']['typical']) * 100:+.2f} points"]])])


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
