"""How the engine scales with the data: 1k -> 16k synthetic users, one epoch each.

``python -m benchmarks.scaling [--quick] [--out DIR] [--users 1000,2000,4000,8000,16000]``

A small random BERT (hidden 128, 2 layers, trained from scratch; its WordPiece vocabulary is learnt per data
set) keeps the full sweep to about 35 minutes here while the engine does all of its work: data generation and
tokenization (timed as setup), dynamic batching, dedup, the cache, the autoregressive loss. Per size: the
training loop's seconds for one epoch against the targets trained, with a least-squares line through the origin
and its R² (cost linear in clicks), and the process's peak resident memory (data preparation included).
``--out`` keeps the runs and reuses finished ones.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine, md_table, run_job_kept, write_results

SMALL = ["model.encoder=random:hidden=128,layers=2,heads=2,intermediate=256", "model.vocab_size=4000"]
TINY = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800"]


def r2_through_origin(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope of y = a x and its R² against the mean model (1 = perfectly linear)."""
    a = float(x @ y / (x @ x))
    ss_res = float(((y - a * x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return a, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny encoder, 200-800 users")
    p.add_argument("--users", default="")
    p.add_argument("--out", default="", help="keep the runs here and reuse finished ones")
    a = p.parse_args(argv)
    sizes = [int(u) for u in (a.users or ("200,400,800" if a.quick else "1000,2000,4000,8000,16000")).split(",")]
    model = TINY if a.quick else SMALL
    info = machine()
    jobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for u in sizes:
            # each size its own cache dir: the data set and its tokenized store are built inside the timed process
            jobs[u] = run_job_kept(f"users_{u}", [f"data.synthetic_users={u}", *model, "eval.max_impressions=200",
                                                  f"data.cache_dir={root}/cache_{u}"], root, timeout=4 * 3600)
            s = jobs[u]["stats"]
            print(f"{u} users: {s['clicks_trained']:,} targets in {s['wall_seconds']:.1f} s, peak {s['peak_rss_mb']:.0f} MiB",
                  flush=True)
    clicks = np.array([jobs[u]["stats"]["clicks_trained"] for u in sizes], dtype=float)
    secs = np.array([jobs[u]["stats"]["wall_seconds"] for u in sizes])
    slope, r2 = r2_through_origin(clicks, secs)
    rows = [[f"{u:,}", f"{j['stats']['clicks_trained']:,}", f"{j['stats']['news_encoded']:,}",
             f"{j['stats']['wall_seconds']:.1f}", f"{j['stats']['clicks_per_second']:.0f}",
             f"{j['stats']['setup_seconds']:.1f}", f"{j['stats']['peak_rss_mb']:.0f}", f"{j['metrics']['auc']:.4f}"]
            for u, j in jobs.items()]
    peaks = [jobs[u]["stats"]["peak_rss_mb"] for u in sizes]
    payload = {"machine": info, "quick": a.quick, "model": model, "users": sizes, "r2": r2,
               "seconds_per_target": slope, "peak_rss_mb": dict(zip(map(str, sizes), peaks)),
               "peak_rss_growth": peaks[-1] / peaks[0], "runs": {str(u): j for u, j in jobs.items()}}
    md = ["# Scaling with the data\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Model: `{' '.join(model)}`, one epoch per size, one process; dev AUC on 200 impressions.\n",
          md_table(["users", "targets", "news encoded", "train s", "targets/s", "setup s", "peak RSS MiB", "dev AUC"], rows),
          f"\nTraining time against targets: {slope * 1000:.2f} ms per target, R² = {r2:.4f} (line through the origin). "
          f"Peak memory grows {peaks[-1] / peaks[0]:.2f}x for {sizes[-1] / sizes[0]:.0f}x the users.\n"]

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot(clicks, secs, "o")
        ax[0].plot([0, clicks.max()], [0, slope * clicks.max()], "--", label=f"R² {r2:.3f}")
        ax[0].set_xlabel("targets per epoch")
        ax[0].set_ylabel("training seconds")
        ax[0].legend()
        ax[1].plot(sizes, peaks, "o-")
        ax[1].set_xscale("log")
        ax[1].set_xlabel("users")
        ax[1].set_ylabel("peak RSS MiB")
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    write_results("scaling_quick" if a.quick else "scaling", payload, "\n".join(md), plot)
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
