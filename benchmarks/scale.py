"""Setup at scale: parsing MIND-large-shaped logs, before and after, and what a rank holds when it is done.

``python -m benchmarks.scale [--quick] [--out DIR]``

Logs shaped like MIND-large's (issue 31: 37 candidates and a history of 33 news on average per impression, 3.1
impressions per user, about 590 bytes a line, MIND-large's 130k news ids) are generated at 1/40, 1/20 and 1/10 of
its 2.6M train and dev lines. Each size is loaded by ``load_dataset`` (the news file, the log, the time split into
train and dev) in a fresh process, three ways:

- ``before``: the line-by-line reader, no parse cache (the reader before issue 31);
- ``builder``: the bulk reader, parsing and writing the parse cache (rank 0 of a first start, or the first rank of
  a node with a node-local cache);
- ``reader``: the parse cache read back (every other rank, and every rank of a restart).

Each process reports its load seconds, its peak resident memory (``ru_maxrss``) and its resident memory before the
load (the interpreter and its imports). Peak memory is fitted as a line through the three sizes and extrapolated
to MIND-large's 2.6M lines; the parse speedup is the per-line time of
``before`` over ``builder`` (median over sizes), and ``reader`` over ``before`` is what a restart saves.

Then the main job's defaults train a few steps on 1, 2 and 4 gloo ranks: collective bytes per step and the
checkpoint's size (shared part, ranks' parts) against the world size, fitted and read at 32 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, md_table, write_results

MIND_LARGE_LINES = 2_600_000
MIND_LARGE_NEWS = 130_000
FRACTIONS = (40, 20, 10)
MODES = ("before", "builder", "reader")


def generate(out: Path, lines: int, news: int, seed: int = 0) -> None:
    """news.tsv and behaviors.tsv in MIND's format: 3.1 impressions per user, histories of mean 33 (geometric),
    37 candidates of mean (1 to 74), one or two clicked."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"N{i + 1}" for i in range(news)]
    with open(out / "news.tsv", "w") as f:
        for i in ids:
            f.write(f"{i}\tnews\tworld\ta short title of news {i}\tits abstract\t\t[]\t[]\n")
    users = max(int(lines / 3.1), 1)
    pop = rng.zipf(1.3, size=4_000_000) % news  # popular news get most clicks
    pos = 0
    t0 = 1573466400  # 11/11/2019
    with open(out / "behaviors.tsv", "w") as f:
        for k in range(lines):
            u = rng.integers(users)
            h = int(min(rng.geometric(1 / 33), 400))
            c = int(rng.integers(1, 74))
            if pos + h + c > len(pop):
                pos = 0
            hist = " ".join(ids[j] for j in pop[pos:pos + h])
            pos += h
            cand = pop[pos:pos + c]
            pos += c
            clicked = set(rng.choice(c, size=min(c, 1 + int(rng.random() < 0.3)), replace=False).tolist())
            imps = " ".join(f"{ids[j]}-{int(n in clicked)}" for n, j in enumerate(cand))
            t = time.gmtime(t0 + int(rng.integers(6 * 86400)))
            stamp = f"{t.tm_mon}/{t.tm_mday}/{t.tm_year} {(t.tm_hour % 12) or 12}:{t.tm_min:02d}:{t.tm_sec:02d} " \
                    f"{'AM' if t.tm_hour < 12 else 'PM'}"
            f.write(f"{k + 1}\tU{u}\t{stamp}\t{hist}\t{imps}\n")


def child(mode: str, data: Path, cache: Path) -> dict:
    """One load in this process (see the module's docstring)."""
    from speedyrec.config import load_config
    from speedyrec.data import dataset
    from speedyrec.data.behaviors import read_mind_behaviors_by_line

    if mode == "before":
        dataset.read_mind_behaviors = read_mind_behaviors_by_line
        dataset.cache_dir_of = lambda cfg: None  # no parse cache
    parse = [0.0]  # seconds in the log reader itself (the news file's reading and the split excluded)
    reader = dataset.read_mind_behaviors

    def timed(*args, **kw):
        t0 = time.perf_counter()
        try:
            return reader(*args, **kw)
        finally:
            parse[0] += time.perf_counter() - t0

    dataset.read_mind_behaviors = timed
    import psutil

    cfg = load_config(None, ["data.format=mind", f"data.dir={data}", f"data.cache_dir={cache}"]).data
    base = psutil.Process().memory_info().rss / 2**20  # the interpreter and its imports, before any data
    t = time.perf_counter()
    ds = dataset.load_dataset(cfg)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "parse_seconds": parse[0], "peak_rss_mb": peak, "rss_before_mb": base,
            "setup_mb": peak - base, "impressions": len(ds.train) + len(ds.dev), "news": len(ds.news)}


def run_child(mode: str, data: Path, cache: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", mode, str(data), str(cache)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


WORLDS = (1, 2, 4)
WORLD_TARGET = 32


def world_run(root: Path, world: int, quick: bool) -> dict:
    """The main job's defaults for a few steps on ``world`` gloo ranks (one torchrun launch): collective bytes per
    step (stats.json) and the size of its checkpoint, in all and by part."""
    from benchmarks.quality import TINY6

    out = root / f"world_{world}"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    steps = 2 if quick else 4
    overrides = [f"out_dir={out}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                 "train.keep_checkpoints=1", "eval.max_impressions=20", *(TINY6 + ["data.synthetic_users=300"]
                                                                          if quick else [])]
    proc = subprocess.run([*launcher, "--standalone", f"--nproc_per_node={world}", "-m", "speedyrec.train", "--quiet",
                           *overrides], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    stats = json.loads((out / "stats.json").read_text())
    ckpt = next((out / "checkpoints").glob("step_*"))
    parts = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    return {"world": world, "steps": stats["steps"], "collective_bytes_per_step": stats["collective_bytes_per_step"],
            "checkpoint_bytes": sum(parts.values()),
            "checkpoint_shared_bytes": sum(v for k, v in parts.items() if k.startswith("model")),
            "checkpoint_rank_bytes": sum(v for k, v in parts.items() if k.startswith("rank")),
            "overrides": overrides}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1/4000, 1/2000 and 1/1000 of MIND-large (checks the harness)")
    p.add_argument("--out", default="", help="keep the generated logs here (default: a temporary folder)")
    p.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return {}
    info = machine()
    fractions = tuple(f * 100 for f in FRACTIONS) if a.quick else FRACTIONS
    news = MIND_LARGE_NEWS // (100 if a.quick else 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        for frac in fractions:
            lines = MIND_LARGE_LINES // frac
            data = root / f"mind_large_1_{frac}"
            if not (data / "behaviors.tsv").is_file():
                generate(data, lines, news)
            cache = root / f"cache_1_{frac}"
            shutil.rmtree(cache, ignore_errors=True)
            row = {"fraction": f"1/{frac}", "lines": lines, "bytes": (data / "behaviors.tsv").stat().st_size}
            for mode in MODES:  # in this order: the builder writes the cache the reader reads
                row[mode] = run_child(mode, data, cache)
            rows.append(row)
            print(json.dumps(row), flush=True)
        worlds = [world_run(root, w, a.quick) for w in WORLDS]
    per_line = {m: [r[m]["seconds"] / r["lines"] * 1e6 for r in rows] for m in MODES}
    # the log's parse itself (the reader's own seconds), and the whole load (the news file and the split too)
    parse_us = {m: [r[m]["parse_seconds"] / r["lines"] * 1e6 for r in rows] for m in ("before", "builder")}
    speedups = [b / f for b, f in zip(parse_us["before"], parse_us["builder"])]
    load_speedups = [b / f for b, f in zip(per_line["before"], per_line["builder"])]
    lines = [r["lines"] for r in rows]
    extrapolated = {}
    for m in MODES:
        a0, b0 = fit(lines, [r[m]["peak_rss_mb"] for r in rows])
        extrapolated[m] = {"intercept_mb": a0, "mb_per_million_lines": b0 * 1e6,
                           "mind_large_mb": a0 + b0 * MIND_LARGE_LINES}
    at32 = {}
    for key in ("collective_bytes_per_step", "checkpoint_bytes", "checkpoint_shared_bytes", "checkpoint_rank_bytes"):
        # one rank runs no collective at all: the collective line goes through the runs of 2 ranks and more
        pts = [(w["world"], w[key]) for w in worlds if w["world"] > 1 or key != "collective_bytes_per_step"]
        a0, b0 = fit([p[0] for p in pts], [p[1] for p in pts])
        at32[key] = a0 + b0 * WORLD_TARGET
    payload = {
        "parse_speedup": statistics.median(speedups),
        "load_speedup": statistics.median(load_speedups), "parse_us_per_line": parse_us,
        "restart_speedup": statistics.median(b / r for b, r in zip(per_line["before"], per_line["reader"])),
        # the worst rank: the one that parses (rank 0 of a first start); the others read the cache
        "mind_large_setup_peak_rss_mb_per_rank": max(extrapolated["builder"]["mind_large_mb"],
                                                     extrapolated["reader"]["mind_large_mb"]),
        "mind_large_setup_peak_rss_mb": {m: extrapolated[m]["mind_large_mb"] for m in MODES},
        "us_per_line": per_line, "speedups": speedups, "extrapolation": extrapolated, "rows": rows,
        "worlds": worlds, "at_world_32": at32,
        "machine": info, "quick": a.quick,
    }
    md = ["# Setup at scale: parsing MIND-large-shaped logs\n",
          f"Device: {info['device']}. MIND-large-shaped logs (37 candidates, history mean 33, 3.1 impressions per user, "
          f"{news:,} news) at {', '.join(r['fraction'] for r in rows)} of MIND-large's {MIND_LARGE_LINES:,} train and "
          "dev lines; each loaded by `load_dataset` in a fresh process: `before` the line-by-line reader without a "
          "parse cache, `builder` the bulk reader parsing and writing the cache (the rank that parses), `reader` "
          "the cache read back (every other rank, every restart). Parse: the log reader's own seconds per line; load: "
          f"all of `load_dataset` (the news file of {news:,} news, the time split and the cache's writing too). "
          f"Command: `python -m benchmarks.scale{' --quick' if a.quick else ''}`.\n",
          md_table(["lines", "MB", "before parse µs/line", "builder parse µs/line", "parse speedup", "before load s",
                    "builder load s", "reader load s", "before peak MiB", "builder peak MiB", "reader peak MiB"],
                   [[f"{r['lines']:,}", f"{r['bytes'] / 1e6:.0f}", f"{pb:.1f}", f"{pf:.1f}", f"{s:.1f}x",
                     f"{r['before']['seconds']:.1f}", f"{r['builder']['seconds']:.1f}",
                     f"{r['reader']['seconds']:.2f}", f"{r['before']['peak_rss_mb']:.0f}",
                     f"{r['builder']['peak_rss_mb']:.0f}", f"{r['reader']['peak_rss_mb']:.0f}"]
                    for r, s, pb, pf in zip(rows, speedups, parse_us["before"], parse_us["builder"])]),
          f"\nParsing the log: {payload['parse_speedup']:.1f}x faster per line (median over the sizes; goal 10x); the "
          f"whole load {payload['load_speedup']:.1f}x; a rank that reads the cache instead of parsing loads "
          f"{payload['restart_speedup']:.0f}x sooner than one that parses line by line.\n",
          "Peak resident memory, a line through the three sizes, at MIND-large's 2.6M lines (goal: 1 GiB per rank):\n",
          md_table(["mode", "MiB at 0 lines", "MiB per million lines", "MiB at MIND-large"],
                   [[m, f"{extrapolated[m]['intercept_mb']:.0f}", f"{extrapolated[m]['mb_per_million_lines']:.0f}",
                     f"{extrapolated[m]['mind_large_mb']:.0f}"] for m in MODES]),
          "\n## Collectives and checkpoints against the world size\n",
          f"The main job's defaults ({'a tiny encoder, ' if a.quick else ''}{worlds[0]['steps']} steps, a checkpoint "
          "at the end) on 1, 2 and 4 gloo ranks of this machine, a line through them read at 32 ranks (for "
          "collectives through 2 and 4 ranks: one rank runs none). Collective bytes: what one rank puts into or gets out of collectives per optimizer step (an all-reduce's buffer, an "
          "all-gather's whole output, DDP's gradient buckets; stats.json `collective_bytes_per_step`). Checkpoint: "
          "the step's folder, its shared part (model, optimizer, the replicated embedding cache, once) and the ranks' "
          "own parts (RNG states, loader positions, counters).\n",
          md_table(["ranks", "collective MB per step", "checkpoint MB", "shared part MB", "ranks' parts MB"],
                   [[w["world"], f"{w['collective_bytes_per_step'] / 1e6:.2f}", f"{w['checkpoint_bytes'] / 1e6:.1f}",
                     f"{w['checkpoint_shared_bytes'] / 1e6:.1f}", f"{w['checkpoint_rank_bytes'] / 1e6:.2f}"]
                    for w in worlds]
                   + [[f"{WORLD_TARGET} (fitted)", f"{at32['collective_bytes_per_step'] / 1e6:.2f}",
                       f"{at32['checkpoint_bytes'] / 1e6:.1f}", f"{at32['checkpoint_shared_bytes'] / 1e6:.1f}",
                       f"{at32['checkpoint_rank_bytes'] / 1e6:.2f}"]])]
    write_results("scale_quick" if a.quick else "scale", payload, "\n".join(md),
                  plot=lambda path: _plot(path, rows))
    print("\n".join(md))
    return payload


def _plot(path, rows) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = [r["lines"] for r in rows]
    for m, style in zip(MODES, ("o-", "s-", "^-")):
        axes[0].plot(lines, [r[m]["seconds"] for r in rows], style, label=m)
        axes[1].plot(lines, [r[m]["peak_rss_mb"] for r in rows], style, label=m)
    axes[0].set_ylabel("load seconds")
    axes[1].set_ylabel("peak resident MiB")
    for ax in axes:
        ax.set_xlabel("log lines")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
