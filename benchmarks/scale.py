"""Setup at scale: parsing MIND-large-shaped logs, before and after, and what a rank holds when it is done.

``python -m benchmarks.scale [--quick] [--out DIR] [--worlds-only | --columnar-only]``

Logs shaped like MIND-large's (issue 31: 37 candidates and a history of 33 news on average per impression, 3.1
impressions per user, about 590 bytes a line, MIND-large's 130k news ids; its layout: a train/ and a dev/ folder,
85% of the lines in train) are generated at 1/40, 1/20 and 1/10 of its 2.6M train and dev lines. Each size is set
up in fresh processes, each standing for rank 0 of a launch on W ranks: the news file and the logs read
(``load_dataset``), then the training sequences built:

- ``before``: the line-by-line reader, no parse cache, every user's sequences built (every rank did all of it
  before issue 31, then kept 1/W of the units);
- ``builder_W``: the bulk reader, parsing and writing the parse cache (rank 0 of a first start, or the first rank
  of a node with a node-local cache), then this rank's users' sequences only (``user_share``);
- ``reader_W``: the parse cache read back mapped (every other rank, every rank of a restart), then this rank's
  users' sequences only.

Each process reports its load seconds, the log parse's own seconds, its peak resident memory (``ru_maxrss``) and
its resident memory before the load (the interpreter and its imports). Peak memory is fitted as a line through the
three sizes and extrapolated to MIND-large's 2.6M lines, for W = 8 (one 8-GPU node) and W = 32; the parse speedup
is the log parse's time per line of ``before`` over ``builder`` (median over sizes).

A columnar reader? Each size's train log is also parsed by pyarrow and polars into the arrays ours gives, checked
equal, and timed beside ours (benchmarks.columnar; ``--columnar-only`` measures these alone, beside the committed
rest).

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

from benchmarks.common import RESULTS, machine, md_table, write_results

MIND_LARGE_LINES = 2_600_000
MIND_LARGE_NEWS = 130_000
FRACTIONS = (40, 20, 10)
RANKS = (8, 32)
MODES = ("before",) + tuple(f"{m}_{w}" for w in RANKS for m in ("builder", "reader"))
TRAIN_SHARE = 0.855  # MIND-large: 2.23M of its 2.61M train and dev lines are train


def generate(out: Path, lines: int, news: int, seed: int = 0) -> None:
    """train/ and dev/ in MIND's format (all news in train/news.tsv): 3.1 impressions per user, histories of mean 33
    (geometric), 37 candidates of mean (1 to 74), one or two clicked; dev's impressions after train's."""
    rng = np.random.default_rng(seed)
    for split in ("train", "dev"):
        (out / split).mkdir(parents=True, exist_ok=True)
    ids = [f"N{i + 1}" for i in range(news)]
    with open(out / "train" / "news.tsv", "w") as f:
        for i in ids:
            f.write(f"{i}\tnews\tworld\ta short title of news {i}\tits abstract\t\t[]\t[]\n")
    (out / "dev" / "news.tsv").write_text("")
    users = max(int(lines / 3.1), 1)
    pop = rng.zipf(1.3, size=4_000_000) % news  # popular news get most clicks
    pos = 0
    t0 = 1573466400  # 11/11/2019
    n_train = int(lines * TRAIN_SHARE)
    files = [open(out / split / "behaviors.tsv", "w") for split in ("train", "dev")]
    try:
        for k in range(lines):
            dev = k >= n_train
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
            t = time.gmtime(t0 + (5 * 86400 if dev else 0) + int(rng.integers(86400 if dev else 5 * 86400)))
            stamp = f"{t.tm_mon}/{t.tm_mday}/{t.tm_year} {(t.tm_hour % 12) or 12}:{t.tm_min:02d}:{t.tm_sec:02d} " \
                    f"{'AM' if t.tm_hour < 12 else 'PM'}"
            files[dev].write(f"{k + 1}\tU{u}\t{stamp}\t{hist}\t{imps}\n")
    finally:
        for f in files:
            f.close()


def child(mode: str, data: Path, cache: Path) -> dict:
    """One rank's setup in this process (see the module's docstring)."""
    from speedyrec.config import load_config
    from speedyrec.data import dataset
    from speedyrec.data.behaviors import read_mind_behaviors_by_line, user_share
    from speedyrec.workflows.speedyfeed import build_sequences

    if mode == "before":
        dataset.read_mind_behaviors = lambda paths, news, faults, mlb, listing, optional, spool=None: \
            read_mind_behaviors_by_line(paths, news, faults, mlb, listing, optional)  # it keeps all in memory
        dataset.cache_dir_of = lambda cfg: None  # no parse cache
    parse = [0.0]  # seconds in the log reader itself (the news file's reading excluded)
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
    t = time.perf_counter()
    world = 1 if mode == "before" else int(mode.rsplit("_", 1)[1])
    train = ds.train if world == 1 else user_share(ds.train, 0, world)
    seqs = build_sequences(train, len(ds.news))
    seq_seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "parse_seconds": parse[0], "sequence_seconds": seq_seconds,
            "sequences": len(seqs.clicks), "peak_rss_mb": peak, "rss_before_mb": base, "setup_mb": peak - base,
            "impressions": len(ds.train) + len(ds.dev), "news": len(ds.news)}


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
            "embedding_cache_bytes": tree_tensor_bytes(ckpt / "model.json", ckpt / "model.safetensors",
                                                       "workflow_cache"),
            "frozen_cache_bytes_per_node": stats.get("frozen_cache_bytes_per_node", 0),
            "overrides": overrides}


def tree_tensor_bytes(tree_json: Path, tensors: Path, key: str) -> int:
    """Bytes of the tensors a checkpoint part holds under its tree's top-level ``key`` (read from the safetensors
    header, the tensors not loaded): 0 when the part has no such key (e.g. a sharded embedding cache, kept in the
    ranks' parts)."""
    def ids(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("__tensor__", "__ndarray__") and isinstance(v, str):
                    yield v
                else:
                    yield from ids(v)
        elif isinstance(node, list):
            for v in node:
                yield from ids(v)

    wanted = set(ids(json.loads(tree_json.read_text()).get(key, {})))
    with open(tensors, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k in wanted)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1/4000, 1/2000 and 1/1000 of MIND-large (checks the harness)")
    p.add_argument("--out", default="", help="keep the generated logs here (default: a temporary folder)")
    p.add_argument("--worlds-only", action="store_true", help="run only the world-size runs; the parse rows are the "
                   "committed results' (sizes and bytes need no quiet machine, parse timings do)")
    p.add_argument("--columnar-only", action="store_true", help="measure only the columnar readers (pyarrow, "
                   "polars) against ours on the train logs; the rest is the committed results'")
    p.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return {}
    info = machine()
    fractions = tuple(f * 100 for f in FRACTIONS) if a.quick else FRACTIONS
    news = MIND_LARGE_NEWS // (100 if a.quick else 1)
    rows = []
    saved = json.loads((RESULTS / "scale.json").read_text()) if a.worlds_only or a.columnar_only else None
    if a.columnar_only:
        if saved["quick"] != a.quick:
            raise SystemExit("--columnar-only adds to the committed results, which were measured with"
                             f"{'' if saved['quick'] else 'out'} --quick")
        with tempfile.TemporaryDirectory() as tmp:
            saved["columnar"] = columnar_rows(Path(a.out or tmp), fractions, news)
        saved["columnar_commit"] = info.get("commit")
        return finish(saved)
    if saved is not None:
        if saved["quick"] != a.quick:
            raise SystemExit("--worlds-only reuses the committed parse rows, which were measured with"
                             f"{'' if saved['quick'] else 'out'} --quick")
        rows = saved["rows"]
        # the benchmark's duration (README's table) stays the full one's: the committed run's, whose world-size
        # runs these replace (a minute over, at most), plus this invocation
        info["started"] -= saved["machine"].get("seconds", 0.0)
    parse_commit = saved["machine"].get("commit") if saved else info.get("commit")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        for frac in fractions if saved is None else ():
            lines = MIND_LARGE_LINES // frac
            data = root / f"mind_large_1_{frac}"
            if not (data / "dev" / "behaviors.tsv").is_file():
                generate(data, lines, news)
            cache = root / f"cache_1_{frac}"
            row = {"fraction": f"1/{frac}", "lines": lines,
                   "bytes": sum((data / s / "behaviors.tsv").stat().st_size for s in ("train", "dev"))}
            for mode in MODES:  # in this order: a builder writes the cache the reader after it reads
                if mode.startswith(("before", "builder")):
                    shutil.rmtree(cache, ignore_errors=True)
                row[mode] = run_child(mode, data, cache)
            rows.append(row)
            print(json.dumps(row), flush=True)
        measured_columnar = columnar_rows(root, fractions, news) if saved is None else None
        worlds = [world_run(root, w, a.quick) for w in WORLDS]
    per_line = {m: [r[m]["seconds"] / r["lines"] * 1e6 for r in rows] for m in MODES}
    # the log's parse itself (the reader's own seconds), and the whole load (the news file and the cache too)
    parse_us = {m: [r[m]["parse_seconds"] / r["lines"] * 1e6 for r in rows] for m in ("before", "builder_8")}
    speedups = [b / f for b, f in zip(parse_us["before"], parse_us["builder_8"])]
    load_speedups = [b / f for b, f in zip(per_line["before"], per_line["builder_8"])]
    lines = [r["lines"] for r in rows]
    extrapolated = {}
    for m in MODES:
        a0, b0 = fit(lines, [r[m]["peak_rss_mb"] for r in rows])
        extrapolated[m] = {"intercept_mb": a0, "mb_per_million_lines": b0 * 1e6,
                           "mind_large_mb": a0 + b0 * MIND_LARGE_LINES}
    at_large = {m: extrapolated[m]["mind_large_mb"] for m in MODES}
    per_rank = {w: max(at_large[f"builder_{w}"], at_large[f"reader_{w}"]) for w in RANKS}
    at32 = {}
    for key in ("collective_bytes_per_step", "checkpoint_bytes", "checkpoint_shared_bytes", "checkpoint_rank_bytes",
                "embedding_cache_bytes", "frozen_cache_bytes_per_node"):
        # one rank runs no collective at all: the collective line goes through the runs of 2 ranks and more
        pts = [(w["world"], w[key]) for w in worlds if w["world"] > 1 or key != "collective_bytes_per_step"]
        a0, b0 = fit([p[0] for p in pts], [p[1] for p in pts])
        at32[key] = a0 + b0 * WORLD_TARGET
    payload = {
        "parse_speedup": statistics.median(speedups),
        "load_speedup": statistics.median(load_speedups), "parse_us_per_line": parse_us,
        "restart_speedup": statistics.median(b / r for b, r in zip(per_line["before"], per_line["reader_8"])),
        # the worst rank of an 8-rank node: the one that parses (rank 0 of a first start) or one that reads the cache
        "mind_large_setup_peak_rss_mb_per_rank": per_rank[8],
        "mind_large_setup_peak_rss_mb_per_rank_by_ranks": per_rank,
        "mind_large_setup_peak_rss_mb": at_large,
        "us_per_line": per_line, "speedups": speedups, "extrapolation": extrapolated, "rows": rows,
        "worlds": worlds, "at_world_32": at32, "parse_commit": parse_commit,
        "machine": info, "quick": a.quick,
    }
    if measured_columnar is not None:
        payload.update(columnar=measured_columnar, columnar_commit=info.get("commit"))
    elif "columnar" in saved:  # measured apart (--columnar-only): kept
        payload.update({k: saved[k] for k in ("columnar", "columnar_commit")})
    return finish(payload)


def finish(payload: dict) -> dict:
    md = render(payload)
    write_results("scale_quick" if payload["quick"] else "scale", payload, md,
                  plot=lambda path: _plot(path, payload["rows"]))
    print(md)
    return payload


def render(d: dict) -> str:
    """scale.md from the results alone (a re-render needs no run)."""
    info, rows, quick = d["machine"], d["rows"], d["quick"]
    news = MIND_LARGE_NEWS // (100 if quick else 1)
    parse_us, speedups, extrapolated = d["parse_us_per_line"], d["speedups"], d["extrapolation"]
    at_large, worlds, at32 = d["mind_large_setup_peak_rss_mb"], d["worlds"], d["at_world_32"]
    per_rank = {int(w): v for w, v in d["mind_large_setup_peak_rss_mb_per_rank_by_ranks"].items()}
    payload, parse_commit = d, d["parse_commit"]
    md = ["# Setup at scale: parsing MIND-large-shaped logs\n",
          f"Device: {info['device']}. MIND-large-shaped logs (37 candidates, history mean 33, 3.1 impressions per user, "
          f"{news:,} news; train/ and dev/ folders) at {', '.join(r['fraction'] for r in rows)} of MIND-large's "
          f"{MIND_LARGE_LINES:,} train and dev lines. Each process sets up rank 0 of a launch on W ranks: "
          "`load_dataset`, then the training sequences. `before`: the line-by-line reader without a parse cache, "
          "every user's sequences (what every rank did before); `builder_W`: the bulk reader parsing and writing the "
          "cache (the rank that parses), then its own users' sequences; `reader_W`: the cache read back mapped (every "
          "other rank, every restart), then its own users' sequences. Parse: the log reader's own time per line; load: "
          f"all of `load_dataset` (the news file of {news:,} news and the cache's writing too). Command: "
          f"`python -m benchmarks.scale{' --quick' if quick else ''}`; parse rows at commit {parse_commit}.\n",
          md_table(["lines", "MB", "before parse µs/line", "parse µs/line", "parse speedup", "before load s",
                    "load s", "cache read s"],
                   [[f"{r['lines']:,}", f"{r['bytes'] / 1e6:.0f}", f"{pb:.1f}", f"{pf:.1f}", f"{sp:.1f}x",
                     f"{r['before']['seconds']:.1f}", f"{r['builder_8']['seconds']:.1f}",
                     f"{r['reader_8']['seconds']:.2f}"]
                    for r, sp, pb, pf in zip(rows, speedups, parse_us["before"], parse_us["builder_8"])]),
          f"\nParsing the log: {payload['parse_speedup']:.1f}x faster per line (median over the sizes; goal 10x); the "
          f"whole load {payload['load_speedup']:.1f}x; a rank that reads the cache instead of parsing loads "
          f"{payload['restart_speedup']:.0f}x sooner than one that parses line by line.\n",
          "Peak resident memory of a rank's setup (MiB; the interpreter and its imports included), and a line through "
          "the three sizes read at MIND-large's 2.6M lines (goal: 1 GiB per rank):\n",
          md_table(["mode"] + [f"{r['lines']:,} lines" for r in rows] + ["MiB per million lines", "at MIND-large"],
                   [[m] + [f"{r[m]['peak_rss_mb']:.0f}" for r in rows]
                    + [f"{extrapolated[m]['mb_per_million_lines']:.0f}", f"{at_large[m]:,.0f}"] for m in MODES]),
          "\nPer rank at MIND-large, the worse of the rank that parses and the ranks that read: "
          + ", ".join(f"{per_rank[w]:,.0f} MiB on {w} ranks" for w in RANKS) + ".\n",
          "\n## Collectives and checkpoints against the world size\n",
          f"The main job's defaults ({'a tiny encoder, ' if quick else ''}{worlds[0]['steps']} steps, a checkpoint "
          "at the end) on 1, 2 and 4 gloo ranks of this machine, a line through them read at 32 ranks (for "
          "collectives through 2 and 4 ranks: one rank runs none). Collective bytes: what one rank puts into or gets out of collectives per optimizer step (an all-reduce's buffer, an "
          "all-gather's whole output, DDP's gradient buckets; stats.json `collective_bytes_per_step`). Checkpoint: "
          "the step's folder, its shared part (model, optimizer, the replicated embedding cache, once) and the ranks' "
          "own parts (RNG states, loader positions, counters). Caches: the embedding cache's rows as the checkpoint's "
          "shared part holds them (once, whatever the ranks; more rows with more ranks, whose global batch encodes more news per step), and the frozen layers' cache file of a node (one per "
          f"node, mapped by its ranks; stats.json `frozen_cache_bytes_per_node`). World-size runs at commit "
          f"{info.get('commit')}.\n",
          md_table(["ranks", "collective MB per step", "checkpoint MB", "shared part MB", "ranks' parts MB",
                    "embedding cache MB (in the shared part)", "frozen cache MB per node"],
                   [[w["world"], f"{w['collective_bytes_per_step'] / 1e6:.2f}", f"{w['checkpoint_bytes'] / 1e6:.1f}",
                     f"{w['checkpoint_shared_bytes'] / 1e6:.1f}", f"{w['checkpoint_rank_bytes'] / 1e6:.2f}",
                     f"{w['embedding_cache_bytes'] / 1e6:.1f}", f"{w['frozen_cache_bytes_per_node'] / 1e6:.1f}"]
                    for w in worlds]
                   + [[f"{WORLD_TARGET} (fitted)", f"{at32['collective_bytes_per_step'] / 1e6:.2f}",
                       f"{at32['checkpoint_bytes'] / 1e6:.1f}", f"{at32['checkpoint_shared_bytes'] / 1e6:.1f}",
                       f"{at32['checkpoint_rank_bytes'] / 1e6:.2f}", f"{at32['embedding_cache_bytes'] / 1e6:.1f}",
                       f"{at32['frozen_cache_bytes_per_node'] / 1e6:.1f}"]])]
    return "\n".join(md + columnar_section(d))


def columnar_rows(root: Path, fractions: tuple, news: int) -> list[dict]:
    """Our reader against pyarrow's and polars' on each size's train log (benchmarks.columnar.measure)."""
    from benchmarks import columnar
    from speedyrec.data.faults import FaultLog
    from speedyrec.data.news import NewsTable, read_mind_news

    out = []
    for frac in fractions:
        data = root / f"mind_large_1_{frac}"
        if not (data / "dev" / "behaviors.tsv").is_file():
            generate(data, MIND_LARGE_LINES // frac, news)
        table = NewsTable()
        read_mind_news(data / "train" / "news.tsv", table, FaultLog(), 1 << 20)
        m = columnar.measure(data / "train" / "behaviors.tsv", table)
        m["fraction"] = f"1/{frac}"
        m["us_per_line"] = {k: v / m["lines"] * 1e6 for k, v in m["seconds"].items()}
        print(json.dumps(m), flush=True)
        out.append(m)
    return out


def columnar_section(d: dict) -> list[str]:
    """The md's lines on the columnar readers (none before they were measured)."""
    rows = d.get("columnar")
    if not rows:
        return []
    from benchmarks.columnar import ratios, timed_everywhere

    names = timed_everywhere(rows)  # one whose arrays differed at some size is reported below, not tabled
    label = {"speedyrec": "ours (numpy) µs/line", "pyarrow": "pyarrow µs/line", "pyarrow_1_thread":
             "pyarrow, 1 thread µs/line", "polars": "polars µs/line"}
    others = [n for n in names if n != "speedyrec"]
    lines = ["\n## A columnar reader?\n",
             "The train log of each size parsed into the arrays our reader gives (users numbered in order of first "
             "appearance, times in seconds, histories and candidates as news indices, labels, rows sorted by time) by "
             "our bulk reader and by pyarrow and polars with their own kernels (CSV read, id-list split, hash lookup "
             "of every id, strptime; the sort and ragged gathers numpy's). Each columnar parse was checked equal to "
             "ours before it was timed; best of 3 rounds, readers interleaved. They count no faults, spool nothing "
             "and keep no listing, which ours does: their time is a lower bound for a reader built on them. "
             f"benchmarks/columnar.py; commit {d.get('columnar_commit')}.\n",
             md_table(["lines", *[label[n] for n in names]],
                      [[f"{r['lines']:,}", *[f"{r['us_per_line'][n]:.2f}" for n in names]] for r in rows])]
    differs = {n: f for r in rows for n, f in r.get("differs", {}).items()}
    if differs:
        lines.append("\nArrays that differed from ours (not timed): "
                     + "; ".join(f"{n}: {', '.join(f)}" for n, f in differs.items()) + ".")
    missing = sorted({n for r in rows for n in r.get("missing", [])})
    if missing:
        lines.append(f"\nNot installed, not measured: {', '.join(missing)}.")
    if others:
        ratio = ratios(rows)
        best = min(ratio, key=ratio.get)
        if ratio[best] < 0.9:
            verdict = (f"{best} parses these plain lines in {ratio[best]:.2f}x our time (median over the sizes): "
                       "faster, before it counts any fault; a reader built on it would have to keep ours for "
                       "the lines it cannot take.")
        else:
            verdict = (f"The fastest columnar reader, {best}, takes {ratio[best]:.2f}x our time per line (median "
                       "over the sizes), before counting any fault: numpy alone is kept, and pyarrow and polars "
                       "are not dependencies.")
        lines.append("\n" + verdict)
    return lines


def _plot(path, rows) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = [r["lines"] for r in rows]
    for m, style in zip(MODES, ("o-", "s-", "^-", "s--", "^--")):
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
