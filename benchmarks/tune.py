"""The sweep that chooses the engine's defaults for time to quality (not for targets per second).

``python -m benchmarks.tune [--quick] [--out DIR] [--lr 4] [--epochs 2] [--kept-only] [--fresh]``

Speedyfeed on the speedup benchmark's data and model (the synthetic default, the 2-layer MiniLM student, all
layers trained) at its headline learning rate, trained for ``--epochs`` epochs of the log with a dev evaluation
every 20 s of training: the defaults (of stage=finetune, every knob spelled out in the run's overrides), then
one knob at a time set to its other value. Each run reports its best dev AUC (and when), the mean of its last
evaluations (where it ends), its AUC after one epoch, and the training seconds to the typical workflow's best dev AUC as
measured by ``benchmarks.speedup`` (read from ``benchmarks/results/speedup.json``: an AUC level, not a time, so
the times compared here are all from this one run). No early stopping: a learning-rate schedule only ends where
it is planned to.

Knobs: ``engine.random_negatives`` (uniform, or click popularity^0.75: history clicks are popularity-driven,
so uniform negatives let a model score popularity instead of the user's interest), ``train.lr_schedule``
(constant, or linear decay over the run), ``train.warmup_steps``, ``engine.negatives`` (per click: 4 costs
about 2x per target, so it is compared over the same epochs, not the same time) and ``engine.inbatch_negatives``
(every news of the batch the user did not click as a negative too, at no extra encoding). Full mode: about 20 min per run
here with 4 negatives (the default of stage=finetune), 10 with 1, about 2 hours in all (119 min measured).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, committed_runs, machine, md_table, run_job_kept, write_results
from benchmarks.speedup import FULL, QUICK, lr_overrides, rate, seconds_to, target_auc
from speedyrec.config import load_config

PLATEAU = 10  # the last evaluations of a run, averaged: where it ends, less noisy than its best single point
# knob -> the values tried; the run of the default value is shared by all knobs
KNOBS = {"engine.random_negatives": ("uniform", "popularity"), "train.lr_schedule": ("constant", "linear"),
         "train.warmup_steps": (0, 20), "engine.negatives": (1, 4), "engine.inbatch_negatives": (False, True)}


def defaults() -> dict:
    """Each knob's default for stage=finetune (``auto`` values resolved as a run resolves them)."""
    cfg = load_config(overrides=["stage=finetune"])
    out = {}
    for knob, values in KNOBS.items():
        section, name = knob.split(".")
        out[knob] = getattr(getattr(cfg, section), name)
        if out[knob] not in values:
            raise ValueError(f"{knob}: the default {out[knob]!r} is not among the values swept {values}")
    return out


def _spell(v) -> str:
    """A value as a command-line override spells it (booleans as true / false)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def variants(default: dict) -> list[tuple[str, list[str]]]:
    """(run name, overrides): the defaults, then each knob at each of its other values. Every run names every
    knob's value, so a kept run is never reused after a default changed (its overrides differ)."""
    spelled = [f"{k}={_spell(v)}" for k, v in default.items()]
    out = [("defaults", spelled)]
    for knob, values in KNOBS.items():
        out += [(f"{knob}={_spell(v)}", [o for o in spelled if not o.startswith(knob + "=")] + [f"{knob}={_spell(v)}"])
                for v in values if v != default[knob]]
    return out


def summary(job: dict, target: float | None) -> dict:
    curve, per_epoch = job["curve"], job["stats"]["clicks_in_data"]
    best = max(curve, key=lambda p: p["auc"])
    epoch_one = [p for p in curve if p["clicks_trained"] <= per_epoch]  # evaluations within the first epoch
    last = np.array([p["auc"] for p in curve[-PLATEAU:]])
    return {"best_auc": best["auc"], "best_at_seconds": best["train_seconds"], "final_auc": curve[-1]["auc"],
            "last_mean_auc": float(last.mean()), "last_std_auc": float(last.std(ddof=1)) if len(last) > 1 else 0.0,
            "best_at_epoch": best["clicks_trained"] / per_epoch,
            "auc_after_one_epoch": epoch_one[-1]["auc"] if epoch_one else None,
            "seconds_to_target": seconds_to(job, target) if target else None,
            "seconds_to_near_target": seconds_to(job, target - 0.005) if target else None,
            "targets_per_second": rate(job), "train_seconds": curve[-1]["train_seconds"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users: checks the harness")
    p.add_argument("--out", default="", help="keep the runs here and reuse finished ones (default: a temporary folder)")
    p.add_argument("--lr", type=float, default=4.0, help="learning-rate multiple of the defaults (speedup's headline)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--kept-only", action="store_true", help="run nothing: tabulate the runs kept in --out or "
                   "committed, and name the knobs not run yet")
    p.add_argument("--fresh", action="store_true", help="run every variant, even those in the committed results")
    a = p.parse_args(argv)
    if a.kept_only and not a.out:
        p.error("--kept-only reads the runs kept in --out")
    mode = QUICK if a.quick else FULL
    every = mode["every"]["speedyfeed"]
    base = [f"data.synthetic_users={mode['users']}", *mode["model"], *mode["eval"], "train.workflow=speedyfeed",
            *lr_overrides(a.lr), f"train.epochs={a.epochs}", f"eval.every_seconds={every:g}"]
    target = target_auc(a.quick, RESULTS)
    info = machine()
    default = defaults()
    # a sweep takes two hours here: its runs are made across sessions, and a committed run with the same
    # overrides (every knob spelled out, so none from another set of defaults) is not made again
    committed = committed_runs("tune_quick" if a.quick else "tune", a.fresh)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        jobs = {name: run_job_kept(f"tune_{name.replace('=', '_').replace('.', '_')}", base + extra, root,
                                   may_run=not a.kept_only, committed=committed.get(name), timeout=4 * 3600)
                for name, extra in variants(default)}
    missing = [name for name, job in jobs.items() if job is None]
    jobs = {name: job for name, job in jobs.items() if job is not None}
    if "defaults" not in jobs:
        raise SystemExit("benchmarks.tune: the defaults' run is not kept or committed yet: every row is compared "
                         "with it")
    rows = {name: summary(job, target) for name, job in jobs.items()}
    payload = {"machine": info, "quick": a.quick, "lr_multiple": a.lr, "epochs": a.epochs, "every_seconds": every,
               "users": mode["users"], "model": mode["model"], "target_auc": target, "defaults": default,
               "summary": rows, "runs": jobs, "not_run_yet": missing}
    md = report(payload)
    write_results("tune_quick" if a.quick else "tune", payload, md, plot=lambda path: _plot(path, payload))
    print(md)
    return payload


def ends_vs_defaults(summ: dict) -> dict:
    """Run name -> its last evaluations' mean minus the defaults', in AUC points (every run but the defaults)."""
    base = summ["defaults"]["last_mean_auc"]
    return {name: (s["last_mean_auc"] - base) * 100 for name, s in summ.items() if name != "defaults"}


def report(d: dict) -> str:
    info, target = d["machine"], d["target_auc"]
    f = lambda x, fmt="{:.4f}": "not reached" if x is None else fmt.format(x)  # noqa: E731
    head = (f"the typical workflow's best dev AUC in `benchmarks/results/speedup.json` ({target:.4f})" if target
            else "no speedup result yet (run `python -m benchmarks.speedup`)")
    default, summ = d["defaults"], d["summary"]
    rows = [[name, f"{s['best_auc']:.4f} at {s['best_at_seconds']:.0f} s ({s['best_at_epoch']:.2f} epochs)",
             f"{s['last_mean_auc']:.4f} ± {s['last_std_auc']:.4f}", f"{s['final_auc']:.4f}",
             f(s["auc_after_one_epoch"]), f(s["seconds_to_target"], "{:.0f} s"), f(s["seconds_to_near_target"], "{:.0f} s"),
             f"{s['targets_per_second']:.1f}", f"{s['train_seconds']:.0f}"] for name, s in summ.items()]
    base = summ["defaults"]
    diffs = "; ".join(f"{name} {points:+.2f}" for name, points in ends_vs_defaults(summ).items())
    return "".join([
        "# Tuning the engine's defaults for time to quality\n\n",
        f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
        f"Speedyfeed on the synthetic default ({d['users']:,} users), `{' '.join(d['model'])}`, learning rates "
        f"x{d['lr_multiple']:g} the defaults, {d['epochs']} epochs of the log, dev AUC every {d['every_seconds']:g} s of "
        "training, no early stopping; one knob changed per run from the run `defaults` ("
        + ", ".join(f"{k}={_spell(v)}" for k, v in default.items()) + f", the defaults at that commit). Target: {head}. "
        f"Times are training-loop seconds. Last {PLATEAU}: the mean ± std of the run's last {PLATEAU} dev evaluations, "
        "where training ends (its best is one point of a noisy curve).\n\n",
        md_table(["run", "best dev AUC", f"last {PLATEAU} evaluations", "final AUC", "AUC after one epoch",
                  "to the target", "to within 0.5 points", "targets/s", "train s"], rows),
        f"\nLast {PLATEAU} evaluations against `defaults`, in AUC points: {diffs} (the std of `defaults`' last "
        f"{PLATEAU}: {base['last_std_auc'] * 100:.2f}).\n" if diffs else "",
        f"\nNot run yet: {', '.join(d['not_run_yet'])}.\n" if d.get("not_run_yet") else ""])


def _plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, job in d["runs"].items():
        c = job["curve"]
        ax.plot([p["train_seconds"] for p in c], [p["auc"] for p in c], marker=".", lw=1, label=name)
    if d["target_auc"]:
        ax.axhline(d["target_auc"], color="tab:red", lw=0.8, label="typical's best")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("dev AUC")
    ax.legend(fontsize=7)
    ax.set_title("speedyfeed, one knob changed from the defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
