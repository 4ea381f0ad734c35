"""The news-embedding cache's expiry gamma (SpeedyFeed Table 6): quality, hit rate, age, drift and time.

``python -m benchmarks.cache [--quick] [--out DIR] [--gammas 0,10,20,30] [--lr-multiple M]``

The synthetic default, the 2-layer MiniLM student (every layer trained), one epoch per gamma, the same seed
and learning rate (``--lr-multiple`` times the defaults; by default the multiple the speedup benchmark chose,
when its results exist). gamma = 0 is no cache. Dev AUC is evaluated periodically and the best is reported
with the final one. Served-row age (steps) is read from the stamps in the cached rows; drift is measured by
the audit (``engine.cache_audit``): sampled hits are re-encoded with the current parameters and compared by
cosine with the cached vectors, next to the cosine of two dropout passes of the same news (the noise floor).
``--out`` keeps the runs and reuses finished ones.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, machine, md_table, run_job_kept, write_results
from benchmarks.speedup import QUICK, STUDENT, lr_overrides

AUDIT = 8  # hits re-encoded per step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users")
    p.add_argument("--out", default="", help="keep the runs here and reuse finished ones")
    p.add_argument("--gammas", default="0,10,20,30")
    p.add_argument("--lr-multiple", type=float, default=None)
    p.add_argument("--every", type=float, default=None, help="training seconds between dev evaluations (default 30)")
    a = p.parse_args(argv)
    gammas = [int(g) for g in a.gammas.split(",")]
    mult = a.lr_multiple
    if mult is None:
        sp = RESULTS / "speedup.json"
        mult = json.loads(sp.read_text()).get("headline_lr_multiple", 1.0) if sp.exists() and not a.quick else 1.0
    users, model = (QUICK["users"], QUICK["model"]) if a.quick else (2000, STUDENT)
    every = a.every or (2.0 if a.quick else 30.0)
    base = [f"data.synthetic_users={users}", *model, *lr_overrides(mult), "train.epochs=1", f"eval.every_seconds={every:g}",
            *(QUICK["eval"] if a.quick else [])]
    info = machine()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for g in gammas:
            extra = ["engine.cache=false"] if g == 0 else [f"engine.cache_gamma={g}", f"engine.cache_audit={AUDIT}"]
            runs[g] = run_job_kept(f"gamma_{g}", base + extra, root, timeout=4 * 3600)
    rows, summary = [], {}
    for g, job in runs.items():
        s, m = job["stats"], job["metrics"]
        best = max(p["auc"] for p in job["curve"])
        summary[g] = {"best_auc": best, "final_auc": m["auc"], "hit_rate": s["cache_hits"] / max(s["cache_lookups"], 1),
                      "served_age_mean": s.get("served_age_mean"), "served_age_max": s.get("served_age_max"),
                      "drift_cos_mean": s.get("cache_drift_cos_mean"), "drift_cos_min": s.get("cache_drift_cos_min"),
                      "noise_cos_mean": s.get("cache_noise_cos_mean"), "train_seconds": s["wall_seconds"],
                      "targets_per_second": s["clicks_per_second"], "news_encoded": s["news_encoded"]}
        v = summary[g]
        rows.append([g, f"{best:.4f}", f"{m['auc']:.4f}", f"{v['hit_rate']:.1%}",
                     "n/a" if v["served_age_mean"] is None else f"{v['served_age_mean']:.1f} / {v['served_age_max']:.0f}",
                     "n/a" if v["drift_cos_mean"] is None else f"{v['drift_cos_mean']:.4f} / {v['drift_cos_min']:.4f}",
                     "n/a" if v["noise_cos_mean"] is None else f"{v['noise_cos_mean']:.4f}",
                     f"{v['news_encoded']:,}", f"{v['train_seconds']:.0f}", f"{v['targets_per_second']:.1f}"])
    payload = {"machine": info, "quick": a.quick, "users": users, "model": model, "lr_multiple": mult,
               "summary": {str(g): v for g, v in summary.items()},
               "runs": {str(g): j for g, j in runs.items()}}
    if 0 in summary and 20 in summary:
        payload["gamma20_minus_gamma0_auc_points"] = (summary[20]["best_auc"] - summary[0]["best_auc"]) * 100
    md = ["# The embedding cache: expiry gamma\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Data: synthetic default, {users} users. Model: `{' '.join(model)}`, learning rates x{mult:g} the defaults, "
          f"one epoch each, seed 0; dev AUC every {every:g} s of training. Lookup probability 1 - exp(-beta t), "
          f"beta = engine.cache_beta (default). Drift: {AUDIT} hits per step re-encoded with the current parameters "
          "(cosine, mean / min), beside two dropout passes of the same news (noise floor).\n",
          md_table(["gamma", "best dev AUC", "final dev AUC", "hit rate", "served age mean / max", "drift cos mean / min",
                    "noise floor cos", "news encoded", "train s", "targets/s"], rows)]
    if "gamma20_minus_gamma0_auc_points" in payload:
        md.append(f"\ngamma = 20 against no cache: {payload['gamma20_minus_gamma0_auc_points']:+.2f} AUC points (best dev AUC).\n")

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for g, job in runs.items():
            ax.plot([pt["train_seconds"] for pt in job["curve"]], [pt["auc"] for pt in job["curve"]], marker=".",
                    label=f"gamma {g}" if g else "no cache")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("dev AUC")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    write_results("cache_quick" if a.quick else "cache", payload, "\n".join(md), plot)
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
