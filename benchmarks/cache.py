"""The news-embedding cache's expiry gamma (SpeedyFeed Table 6): quality, hit rate, age, drift and time.

``python -m benchmarks.cache [--quick] [--out DIR] [--gammas 0,10,20,30,20d,20e,0@1,20@1] [--seeds 0]
[--lr-multiple M] [--kept-only] [--fresh]``

The synthetic default, the 2-layer MiniLM student (every layer trained), one epoch per gamma and seed, the same
learning rate (``--lr-multiple`` times the defaults; by default the multiple the speedup benchmark chose, when its
results exist) and the default schedule. gamma = 0 is no cache. Dev AUC is evaluated periodically; each run reports
its best, its final AUC and the mean of its last evaluations (the best of a noisy curve is one point: the end of
the run says more about what the cache costs). Served-row age (steps) is read from the stamps in the cached rows;
drift is measured by the audit (``engine.cache_audit``): sampled hits are re-encoded with the current parameters
and compared by cosine with the cached vectors, next to the cosine of two dropout passes of the same news (the
noise floor). With several ``--seeds`` the quality figures are mean ± std over them. ``--out`` keeps the runs and
reuses finished ones. A row is ``G[d][e][@M]``: G steps of expiry (0: no cache), ``d``: with deferred cache
gradients, ``e``: trained for the no-cache row's training time instead of one epoch (equal time: the cache's
saving spent on more steps, with the learning-rate schedule fitted to them), ``@M``: learning rates M times the
defaults instead of the benchmark's multiple; each gamma-20 row is compared with the no-cache row of the same
learning rates (``0@M``), seed by seed. A table's runs take hours, across sessions: the runs in the committed
results are reused when they ran the same overrides (``--fresh``: run them again), and ``--kept-only``
re-derives the table from the runs kept in ``--out`` or committed so far; a row with fewer seeds names the ones
it has.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, committed_runs, machine, md_table, run_job_kept, write_results
from benchmarks.speedup import QUICK, STUDENT, lr_overrides, seconds_to, target_auc

AUDIT = 8  # hits re-encoded per step
LAST = 5  # evaluations averaged at the end of a run
QUALITY = ("best_auc", "final_auc", "last_mean_auc")


def run_summary(job: dict) -> dict:
    s, m, auc = job["stats"], job["metrics"], [p["auc"] for p in job["curve"]]
    return {"best_auc": max(auc), "final_auc": m["auc"], "last_mean_auc": float(np.mean(auc[-LAST:])),
            "hit_rate": s["cache_hits"] / max(s["cache_lookups"], 1),
            "served_age_mean": s.get("served_age_mean"), "served_age_max": s.get("served_age_max"),
            "drift_cos_mean": s.get("cache_drift_cos_mean"), "drift_cos_min": s.get("cache_drift_cos_min"),
            "noise_cos_mean": s.get("cache_noise_cos_mean"), "train_seconds": s["wall_seconds"],
            "targets_per_second": s["clicks_per_second"], "news_encoded": s["news_encoded"]}


def summarize(runs: dict, target: float | None = None) -> dict:
    """{gamma: {seed: job}} -> per gamma: the quality figures' mean and std over seeds, the training seconds to
    ``target`` (the typical workflow's best dev AUC) per seed, the rest from seed order's first run (hit rate,
    age, drift and time hardly depend on the seed)."""
    out = {}
    for g, by_seed in runs.items():
        per = [run_summary(j) for j in by_seed.values()]
        out[g] = {**per[0], "seeds": list(by_seed),
                  "seconds_to_target": [seconds_to(j, target) if target else None for j in by_seed.values()]}
        for k in QUALITY:
            v = np.array([r[k] for r in per])
            out[g][k], out[g][k + "_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


def row_spec(g: str) -> tuple[int, bool, bool, float | None]:
    """A row of ``--gammas``: '20de@1' -> (20 steps, deferred gradients, equal time, learning rates x1); no '@':
    None (the benchmark's multiple)."""
    m = re.fullmatch(r"(\d+)(d?)(e?)(?:@(\d*\.?\d+))?", g)
    if not m or (m[4] is not None and float(m[4]) <= 0) or (m[3] and int(m[1]) == 0):
        raise ValueError(f"{g!r} is not a row: G[d][e][@M], G steps of expiry (0: no cache), d: deferred cache "
                         "gradients, e (G > 0): trained for the no-cache row's time, M > 0: learning rates M times the "
                         "defaults")
    return int(m[1]), bool(m[2]), bool(m[3]), None if m[4] is None else float(m[4])


def made_length(overrides: list[str], kept: Path, committed: dict | None) -> list[str]:
    """An equal-time run made before (kept in ``kept``, or committed) keeps the length it was given: the median
    time ratio moves as seeds are added to the table, and a finished run is not made again for a few steps more
    or less. Its overrides when they differ from these only in train.max_steps and train.epochs, else these."""
    length = ("train.max_steps=", "train.epochs=")
    same = [o for o in overrides if not o.startswith(length)]
    for job in ([json.loads(kept.read_text())] if kept.exists() else []) + ([committed] if committed else []):
        if [o for o in job.get("overrides", []) if not o.startswith(length)] == same:
            return job["overrides"]
    return overrides


def row_name(steps: int, deferred: bool, equal: bool, lr: float | None) -> str:
    return f"{steps}{'d' if deferred else ''}{'e' if equal else ''}" + (f"@{lr:g}" if lr is not None else "")


def time_ratio(one_epoch: dict, no_cache: dict) -> float | None:
    """How much longer an epoch takes without the cache than with it ({seed: job} of each row, same learning
    rates): the median over the seeds both ran of the pair's ratio of training times, so that one run slowed by
    a busy machine (the runs are made across sessions) does not decide it. None without a pair."""
    pairs = [no_cache[s]["stats"]["wall_seconds"] / one_epoch[s]["stats"]["wall_seconds"]
             for s in one_epoch if s in no_cache]
    return float(np.median(pairs)) if pairs else None


def lr_of(g: str) -> str:
    """The '@M' part of a row's label ('' for the benchmark's own multiple)."""
    return g[g.index("@"):] if "@" in g else ""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users")
    p.add_argument("--out", default="", help="keep the runs here and reuse finished ones")
    p.add_argument("--gammas", default="0,10,20,30", help="rows G[d][e][@M]: expiry steps (0 = no cache); a 'd' "
                   "suffix (20d): with engine.cache_deferred_grad; 'e' (20e): trained for the time row 0 took, which "
                   "the rows 0 and 20 of the same learning rates measure; '@M' (20@1): learning rates M times the defaults")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lr-multiple", type=float, default=None)
    p.add_argument("--every", type=float, default=None, help="training seconds between dev evaluations (default 30)")
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or "
                   "committed, and name the ones missing (a row with fewer seeds says which it has)")
    p.add_argument("--fresh", action="store_true", help="run every row, even those in the committed results")
    a = p.parse_args(argv)
    if a.kept_only and not a.out:
        p.error("--kept-only reads the runs kept in --out")
    seeds, specs = [int(s) for s in a.seeds.split(",")], {}
    for g in (g.strip() for g in a.gammas.split(",")):
        try:
            spec = row_spec(g)
        except ValueError as e:
            p.error(f"--gammas: {e}")
        specs[row_name(*spec)] = spec
    # an equal-time row runs after the two rows that give its length; they must be in the table
    for g, (steps, deferred, equal, lr) in specs.items():
        if equal and not {row_name(steps, deferred, False, lr), row_name(0, False, False, lr)} <= set(specs):
            p.error(f"--gammas: row {g} is timed by rows {row_name(steps, deferred, False, lr)} and "
                    f"{row_name(0, False, False, lr)}: add them")
    target = target_auc(a.quick, RESULTS)
    mult = a.lr_multiple
    if mult is None:
        sp = RESULTS / "speedup.json"
        mult = json.loads(sp.read_text()).get("headline_lr_multiple", 1.0) if sp.exists() and not a.quick else 1.0
    users, model = (QUICK["users"], QUICK["model"]) if a.quick else (2000, STUDENT)
    every = a.every or (2.0 if a.quick else 30.0)

    def base(lr: float) -> list[str]:
        return [f"data.synthetic_users={users}", *model, *lr_overrides(lr), "train.epochs=1",
                f"eval.every_seconds={every:g}", *(QUICK["eval"] if a.quick else [])]

    info = machine()
    name_ = "cache_quick" if a.quick else "cache"
    committed = committed_runs(name_, a.fresh)
    runs: dict = {}
    ratios: dict = {}  # equal-time row -> the no-cache / cache time ratio its steps were scaled by
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        # the equal-time rows last: the rows that time them first, on every seed
        for s, (g, (steps, deferred, equal, lr)) in [(s, kv) for last in (False, True) for s in seeds
                                                     for kv in specs.items() if kv[1][2] == last]:
            extra = (["engine.cache=false"] if steps == 0 else
                     [f"engine.cache_gamma={steps}", f"engine.cache_audit={AUDIT}"]
                     + (["engine.cache_deferred_grad=true"] if deferred else []))
            overrides = base(mult if lr is None else lr)
            if equal:
                one_epoch = runs.get(row_name(steps, deferred, False, lr), {})
                ratio = time_ratio(one_epoch, runs.get(row_name(0, False, False, lr), {}))
                if ratio is None or str(s) not in one_epoch:
                    print(f"row {g}, seed {s}: left out (the runs that time it are missing)", flush=True)
                    continue
                ratios[g] = ratio
                n = max(1, round(one_epoch[str(s)]["stats"]["steps"] * ratio))
                epochs = math.ceil(n / one_epoch[str(s)]["stats"]["steps"])
                overrides = [o for o in overrides if o != "train.epochs=1"] + [f"train.epochs={epochs}",
                                                                               f"train.max_steps={n}"]
            name = f"gamma_{g.replace('@', '_lr')}" + (f"_seed{s}" if s else "")
            overrides += extra + ([f"train.seed={s}"] if s else [])
            prior = committed.get(g, {}).get(str(s))
            if equal:
                overrides = made_length(overrides, root / name / "job.json", prior)
            job = run_job_kept(name, overrides, root, may_run=not a.kept_only, committed=prior, timeout=4 * 3600)
            if job is not None:
                runs.setdefault(g, {})[str(s)] = job
    if not runs:
        raise SystemExit(f"benchmarks.cache: no run kept in {root}")
    payload = {"machine": info, "quick": a.quick, "users": users, "model": model, "lr_multiple": mult, "every": every,
               "seeds": [s for s in seeds if any(str(s) in by_seed for by_seed in runs.values())],
               "target_auc": target, "summary": summarize(runs, target), "runs": runs, "equal_time_ratio": ratios}
    payload.update(gamma20_vs_gamma0(payload["summary"], runs))
    md = report(payload)
    write_results(name_, payload, md, lambda path: plot(path, payload))
    print(md)
    return payload


def gamma20_rows(summary: dict) -> list[tuple[str, str]]:
    """(gamma-20 row, the no-cache row of its learning rates) for each gamma-20 row that has one: 20 and 20d
    against 0, 20@1 against 0@1."""
    return [(g, "0" + lr_of(g)) for g in summary if row_spec(g)[0] == 20 and "0" + lr_of(g) in summary]


def gamma20_vs_gamma0(summary: dict, runs: dict) -> dict:
    """gamma = 20 (also with deferred gradients, 20d, or at other learning rates, 20@M) against no cache at the
    same learning rates, in AUC points, for each quality figure (the issue's bar: within 0.5): the paired difference
    on each seed both ran (the seed fixes the data order, negatives and initial head, so its spread says how much of
    the mean is noise) and its mean, which is the difference of the rows' means when both ran the same seeds (a row
    measured for fewer seeds so far is compared on those only). Keys: gamma20_minus_gamma0_*,
    gamma20@1_minus_gamma0@1_*."""
    out = {}
    for g, base in gamma20_rows(summary):
        seeds = [s for s in runs[g] if s in runs[base]]
        for k in QUALITY:
            key = f"gamma{g}_minus_gamma{base}_{k.replace('_auc', '')}_auc_points"
            out[key + "_by_seed"] = {s: (run_summary(runs[g][s])[k] - run_summary(runs[base][s])[k]) * 100
                                     for s in seeds}
            out[key] = float(np.mean(list(out[key + "_by_seed"].values())))
    return out


def deferred_legend(d: dict) -> str:
    """What a row with a 'd', 'e' or '@M' suffix is, when the table has one."""
    rows = [g for g in d["summary"] if row_spec(g)[1]]
    equal = [g for g in d["summary"] if row_spec(g)[2]]
    at = [g for g in d["summary"] if "@" in g]
    return ((f" Row{'s' if len(rows) > 1 else ''} {', '.join(rows)}: the same gamma with "
             "`engine.cache_deferred_grad=true` (a served row's gradient reaches the encoder at its news' next fresh "
             "encoding)." if rows else "")
            + (f" Row{'s' if len(at) > 1 else ''} {', '.join(at)}: G@M is gamma G at learning rates M times the "
               "defaults instead." if at else "")
            + (f" Row{'s' if len(equal) > 1 else ''} {', '.join(equal)}: the same gamma trained for the time the "
               "no-cache row took instead of one epoch: its steps per epoch times "
               + ", ".join(f"{d.get('equal_time_ratio', {}).get(g, float('nan')):.3f}" for g in equal)
               + " (the median over the seeds of the no-cache row's training time over the one-epoch row's), the "
               "learning-rate schedule decaying over those steps." if equal else ""))


def row_label(g: str, v: dict, seeds: list) -> str:
    """The row's gamma, with its seeds when it has fewer than the table (a row measured in a later session)."""
    if len(v["seeds"]) == len(seeds):
        return g
    return f"{g} (seed{'s' if len(v['seeds']) > 1 else ''} {', '.join(v['seeds'])})"


def to_target(v: dict) -> str:
    """Each seed's training seconds to the typical workflow's best dev AUC ('-': not reached)."""
    return " / ".join("-" if t is None else f"{t:.0f}" for t in v.get("seconds_to_target", [])) or "n/a"


def target_legend(d: dict) -> str:
    if not d.get("target_auc"):
        return ""
    return (f" S to typical's best: each seed's training seconds to the first dev evaluation at or above the typical "
            f"workflow's best dev AUC in `benchmarks/results/speedup.json` ({d['target_auc']:.4f}; '-': not reached).")


def _q(v: dict, k: str) -> str:
    return f"{v[k]:.4f}" + (f" ± {v[k + '_std']:.4f}" if len(v["seeds"]) > 1 else "")


def report(d: dict) -> str:
    info = d["machine"]
    seeds = d.get("seeds", [0])
    rows = [[row_label(g, v, seeds), _q(v, "best_auc"), _q(v, "final_auc"), _q(v, "last_mean_auc"),
             f"{v['hit_rate']:.1%}",
             "n/a" if v["served_age_mean"] is None else f"{v['served_age_mean']:.1f} / {v['served_age_max']:.0f}",
             "n/a" if v["drift_cos_mean"] is None else f"{v['drift_cos_mean']:.4f} / {v['drift_cos_min']:.4f}",
             "n/a" if v["noise_cos_mean"] is None else f"{v['noise_cos_mean']:.4f}",
             f"{v['news_encoded']:,}", f"{v['train_seconds']:.0f}", f"{v['targets_per_second']:.1f}",
             to_target(v)] for g, v in d["summary"].items()]
    md = ["# The embedding cache: expiry gamma\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Data: synthetic default, {d['users']} users. Model: `{' '.join(d['model'])}`, learning rates x{d['lr_multiple']:g} "
          f"the defaults{d.get('schedule_note', '')}, one epoch each, seed{'s' if len(seeds) > 1 else ''} "
          f"{', '.join(map(str, seeds))}; dev AUC every {d.get('every', 30.0):g} s of training. Lookup probability "
          "1 - exp(-beta t), beta = engine.cache_beta (default). Last 5: the mean of a run's last 5 dev evaluations. "
          f"Drift: {AUDIT} hits per step re-encoded with the current parameters (cosine, mean / min), beside two dropout "
          "passes of the same news (noise floor)." + target_legend(d)
          + (" Quality figures: mean ± std over the seeds; the others from the first seed." if len(seeds) > 1 else "")
          + deferred_legend(d) + "\n",
          md_table(["gamma", "best dev AUC", "final dev AUC", "last 5", "hit rate", "served age mean / max",
                    "drift cos mean / min", "noise floor cos", "news encoded", "train s", "targets/s",
                    "s to typical's best"], rows)]
    if gamma20_rows(d["summary"]):
        md.append("\n" + gamma20_sentence(d))
    return "\n".join(md)


def gamma20_sentence(d: dict) -> str:
    out = []
    for g, base in gamma20_rows(d["summary"]):
        label = ("gamma = 20" + (" with deferred cache gradients" if row_spec(g)[1] else "")
                 + (" trained for no cache's time" if row_spec(g)[2] else "")
                 + (f" at learning rates x{lr_of(g)[1:]}" if lr_of(g) else "") + (f" (row {g})" if g != "20" else ""))
        parts = []
        for k, name in (("best", "best"), ("final", "final"), ("last_mean", "last 5")):
            key = f"gamma{g}_minus_gamma{base}_{k}_auc_points"
            by_seed = d.get(key + "_by_seed", {})
            parts.append(f"{name} {d[key]:+.2f}" + (f" (per seed {', '.join(f'{v:+.2f}' for v in by_seed.values())})"
                                                     if len(by_seed) > 1 else ""))
        paired = list(d.get(f"gamma{g}_minus_gamma{base}_best_auc_points_by_seed", {}))
        fewer = len(paired) < len(d.get("seeds", [0]))
        only = f" (seed{'s' if len(paired) > 1 else ''} {', '.join(paired)} only)" if fewer else ""
        by_seed = [dict(zip(d["summary"][row]["seeds"], d["summary"][row].get("seconds_to_target", [])))
                   for row in (g, base)]
        times = [[t for s, t in row.items() if s in paired and t is not None] for row in by_seed]
        reach = ("; training seconds to the typical workflow's best AUC, median over the seeds that reach it: "
                 f"{np.median(times[0]):.0f} against {np.median(times[1]):.0f}" if all(times) else "")
        out.append(f"{label} against no cache{' at the same learning rates' if lr_of(g) else ''}{only}, AUC points: "
                   f"{', '.join(parts)}{reach}.")
    return " ".join(out) + "\n"


def plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for g, by_seed in d["runs"].items():
        job = next(iter(by_seed.values()))
        ax.plot([pt["train_seconds"] for pt in job["curve"]], [pt["auc"] for pt in job["curve"]], marker=".",
                label=_label(g))
    ax.set_xlabel("training seconds")
    ax.set_ylabel("dev AUC")
    ax.set_title("first seed" if len(d.get("seeds", [0])) > 1 else "")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the curves, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _label(g: str) -> str:
    steps, deferred, equal, lr = row_spec(g)
    return (("no cache" if steps == 0 else f"gamma {steps}") + (", deferred" if deferred else "")
            + (", equal time" if equal else "")
            + (f", lr x{lr:g}" if lr is not None else ""))


if __name__ == "__main__":
    main()
