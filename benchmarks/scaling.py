"""How the engine scales with the data: 1k -> 16k synthetic users, one epoch each.

``python -m benchmarks.scaling [--quick] [--out DIR] [--users 1000,2000,4000,8000,16000]``

A small random BERT (hidden 128, 2 layers, trained from scratch; its WordPiece vocabulary is learnt per data
set) keeps the full sweep to about 20 minutes here while the engine does all of its work: data generation and
tokenization (timed as setup), dynamic batching, dedup, the cache, the autoregressive loss. Per size: the
training loop's seconds for one epoch against the targets trained, with a least-squares line through the origin
and its R² (cost linear in clicks), and peak resident memory in two phases: setup (data generation, tokenization,
models) and training (the epoch and its evaluation). The smallest and the largest size run a second time with
the heap hand-back off (``train.heap_trim_every=0``), side by side: memory and speed with and without it.
``--out`` keeps the runs and reuses finished ones.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine, md_table, run_job_kept, write_results
from speedyrec.config import load_config

# one negative per click (the default is 4): the sweep measures how cost and memory grow with the data, and keeps
# to about 20 minutes here
SMALL = ["model.encoder=random:hidden=128,layers=2,heads=2,intermediate=256", "model.vocab_size=4000", "engine.negatives=1"]
TINY = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800", "engine.negatives=1"]


def r2_through_origin(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope of y = a x and its R² against the mean model (1 = perfectly linear)."""
    a = float(x @ y / (x @ x))
    ss_res = float(((y - a * x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return a, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def memory_sentence(d: dict) -> str:
    """The memory finding of a scaling result, for its table and the README."""
    u0, u1 = str(d["users"][0]), str(d["users"][-1])
    return (f"Training peak {d['train_peak_rss_mb'][u0]:.0f} -> {d['train_peak_rss_mb'][u1]:.0f} MiB "
            f"({d['train_peak_growth']:.2f}x) for {int(u1) // int(u0)}x the users; without the heap hand-back "
            f"{d['no_trim'][u0]['train_peak_rss_mb']:.0f} -> {d['no_trim'][u1]['train_peak_rss_mb']:.0f} MiB "
            f"({d['no_trim_train_peak_growth']:.2f}x). With it, training runs at {d['trim_speed_ratio_at_largest']:.2f}x "
            f"the speed without ({u1} users, side by side).")


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

        def run(u: int, extra: list[str], suffix: str = "") -> dict:
            # each run its own cache dir: the data set and its tokenized store are built inside the timed process
            job = run_job_kept(f"users_{u}{suffix}", [f"data.synthetic_users={u}", *model, "eval.max_impressions=200",
                                                       f"data.cache_dir={root}/cache_{u}{suffix}", *extra], root,
                               timeout=4 * 3600)
            s = job["stats"]
            print(f"{u} users{suffix}: {s['clicks_trained']:,} targets in {s['wall_seconds']:.1f} s, peak MiB: "
                  f"setup {s['setup_peak_rss_mb']:.0f}, training {s['train_peak_rss_mb']:.0f}", flush=True)
            return job

        for u in sizes:
            jobs[u] = run(u, [])
        # the same sizes with freed heap kept by the allocator, as before train.heap_trim_every (its own cache dir, so
        # that setup is measured alike)
        untrimmed = {u: run(u, ["train.heap_trim_every=0"], "_no_trim") for u in (sizes[0], sizes[-1])}
    clicks = np.array([jobs[u]["stats"]["clicks_trained"] for u in sizes], dtype=float)
    secs = np.array([jobs[u]["stats"]["wall_seconds"] for u in sizes])
    slope, r2 = r2_through_origin(clicks, secs)
    def row(u, j, label=""):
        s = j["stats"]
        return [f"{u:,}{label}", f"{s['clicks_trained']:,}", f"{s['news_encoded']:,}", f"{s['wall_seconds']:.1f}",
                f"{s['clicks_per_second']:.0f}", f"{s['setup_seconds']:.1f}", f"{s['setup_peak_rss_mb']:.0f}",
                f"{s['train_peak_rss_mb']:.0f}", f"{s['heap_trims']}", f"{j['metrics']['auc']:.4f}"]

    rows = [row(u, j) for u, j in jobs.items()] + [row(u, j, " (no trim)") for u, j in untrimmed.items()]
    setup_peaks = [jobs[u]["stats"]["setup_peak_rss_mb"] for u in sizes]
    peaks = [jobs[u]["stats"]["train_peak_rss_mb"] for u in sizes]
    first, last = sizes[0], sizes[-1]
    no_trim = {str(u): {"train_peak_rss_mb": j["stats"]["train_peak_rss_mb"],
                        "targets_per_second": j["stats"]["clicks_per_second"]} for u, j in untrimmed.items()}
    no_trim_growth = untrimmed[last]["stats"]["train_peak_rss_mb"] / untrimmed[first]["stats"]["train_peak_rss_mb"]
    speed_ratio = jobs[last]["stats"]["clicks_per_second"] / untrimmed[last]["stats"]["clicks_per_second"]
    payload = {"machine": info, "quick": a.quick, "model": model, "users": sizes, "r2": r2,
               "seconds_per_target": slope, "setup_peak_rss_mb": dict(zip(map(str, sizes), setup_peaks)),
               "train_peak_rss_mb": dict(zip(map(str, sizes), peaks)), "train_peak_growth": peaks[-1] / peaks[0],
               "no_trim": no_trim, "no_trim_train_peak_growth": no_trim_growth,
               "trim_speed_ratio_at_largest": speed_ratio, "heap_trim_every": load_config().train.heap_trim_every,
               "runs": {str(u): j for u, j in jobs.items()},
               "runs_no_trim": {str(u): j for u, j in untrimmed.items()}}
    md = ["# Scaling with the data\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Model: `{' '.join(model)}`, one epoch per size, one process; dev AUC on 200 impressions. Peaks: resident "
          "memory during setup (data, tokens, models) and from the first step on (training and its evaluations); "
          f"trims: freed heap handed back to the system, every {payload['heap_trim_every']} steps "
          "(`train.heap_trim_every`).\n",
          md_table(["users", "targets", "news encoded", "train s", "targets/s", "setup s", "setup peak MiB",
                    "training peak MiB", "trims", "dev AUC"], rows),
          f"\nTraining time against targets: {slope * 1000:.2f} ms per target, R² = {r2:.4f} (line through the origin).\n",
          "\n" + memory_sentence(payload) + "\n"]

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot(clicks, secs, "o")
        ax[0].plot([0, clicks.max()], [0, slope * clicks.max()], "--", label=f"R² {r2:.3f}")
        ax[0].set_xlabel("targets per epoch")
        ax[0].set_ylabel("training seconds")
        ax[0].legend()
        ax[1].plot(sizes, peaks, "o-", label="training peak")
        ax[1].plot(sizes, setup_peaks, "s--", label="setup peak")
        ax[1].plot([first, last], [no_trim[str(first)]["train_peak_rss_mb"], no_trim[str(last)]["train_peak_rss_mb"]],
                   "x:", label="training peak, no heap trim")
        ax[1].set_xscale("log")
        ax[1].set_xlabel("users")
        ax[1].set_ylabel("peak RSS MiB")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    write_results("scaling_quick" if a.quick else "scaling", payload, "\n".join(md), plot)
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
