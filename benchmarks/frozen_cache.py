"""The frozen-prefix cache against recomputing the frozen layers, on the machine it runs on (meant for a GPU).

``python -m benchmarks.frozen_cache [--quick] [--freeze 10,6,2] [--epochs 3] [--out DIR]``

A BERT-base-shaped encoder (12 layers, hidden 768, random weights: the cost does not depend on them) trains on the
synthetic default with the speedyfeed workflow, ``engine.token_budget`` as the MIND-large config sets it, under the
precision the run resolves (bf16 autocast on a GPU). For each number of frozen layers K, two runs, interleaved:
``engine.frozen_cache=true`` (the frozen layers' output computed once per news, kept in host memory, served to the
device as bf16 rows) and ``false`` (the K layers run at every step under no_grad). Per run: targets per second in
each epoch from the log windows (the first epoch fills the cache, the later ones are served from it), the news
computed and served, and the cache's size. ``cache / recompute`` > 1 means the cache trains faster.

Writes ``results/frozen_cache.{json,md}``. Json keys: ``rows`` -> K -> {``cache``, ``recompute``} -> per-epoch
targets/s, and ``speedup_served`` -> K -> the last epoch's cache / recompute ratio; ``default_pays``: whether the
cache wins at the default K of a 12-layer encoder (all but the top 2 frozen), which settles the CUDA default of
``engine.frozen_cache``. Results are written after every run, so a run cut short keeps the pairs that finished.
Not part of ``benchmarks.run``: it is meant for a GPU (BERT-base for three epochs takes hours on 2 CPU cores);
``--quick`` checks the harness anywhere.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import machine, md_table, run_job, write_results

BASE = ["model.encoder=random:hidden=768,layers=12,heads=12,intermediate=3072", "train.workflow=speedyfeed",
        "engine.token_budget=120000", "data.synthetic_users=6000", "train.log_every=4", "eval.max_impressions=2000"]
QUICK = ["model.encoder=random:hidden=32,layers=6,heads=2,intermediate=64", "model.vocab_size=800",
         "data.synthetic_users=300", "train.log_every=2", "eval.max_impressions=200"]
DEFAULT_FREEZE = 10  # model.freeze_layers=-1 on a 12-layer encoder: all but the top 2


def epoch_rates(job: dict) -> list[float]:
    """Median targets/s of each epoch's log windows, the first window of each epoch left out (it holds the loader's
    start and, on a GPU, the allocator's warm-up)."""
    by_epoch: dict[int, list[float]] = {}
    for r in job["log"]:
        by_epoch.setdefault(int(r["epoch"]), []).append(r["targets_per_second"])
    return [statistics.median(v[1:] if len(v) > 2 else v) for _, v in sorted(by_epoch.items())]


def run(name: str, overrides: list[str], out: Path) -> dict:
    import json

    job = run_job(name, overrides, out)
    log = out / name / "log.jsonl"
    job["log"] = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "train"]
    job["epoch_rates"] = epoch_rates(job)
    return job


def report(rows: dict, runs: dict, base: list[str], info: dict, quick: bool) -> dict:
    """Write results/frozen_cache.{json,md} from the pairs finished so far (called after every run: a run cut
    short by a lease's limit keeps what finished)."""
    done = {k: r for k, r in rows.items() if len(r) == 2}
    speedup = {k: r["cache"]["epoch_targets_per_s"][-1] / r["recompute"]["epoch_targets_per_s"][-1]
               for k, r in done.items()}
    first = {k: r["cache"]["epoch_targets_per_s"][0] / r["recompute"]["epoch_targets_per_s"][0] for k, r in done.items()}
    default_pays = speedup[DEFAULT_FREEZE] > 1.0 if DEFAULT_FREEZE in speedup else None
    payload = {"rows": rows, "speedup_served": speedup, "speedup_first_epoch": first, "default_pays": default_pays,
               "overrides": base, "machine": info, "quick": quick, "runs": runs}
    epochs = max((len(v["epoch_targets_per_s"]) for r in rows.values() for v in r.values()), default=0)

    def rates(r, variant):
        got = r.get(variant, {}).get("epoch_targets_per_s", [])
        return [f"{v:,.0f}" for v in got] + ["-"] * (epochs - len(got))

    table = [[k, *rates(r, "recompute"), *rates(r, "cache"), f"{first[k]:.2f}" if k in first else "-",
              f"{speedup[k]:.2f}" if k in speedup else "-",
              f"{r['cache']['frozen_news_computed']:,.0f} / {r['cache']['frozen_news_served']:,.0f}" if "cache" in r
              else "-"] for k, r in rows.items()]
    header = ["frozen layers", *(f"recompute e{e + 1}" for e in range(epochs)), *(f"cache e{e + 1}" for e in range(epochs)),
              "cache / recompute, e1", f"cache / recompute, e{epochs}", "news computed / served (cache)"]
    verdict = ("no pair at the default number of frozen layers yet" if default_pays is None else
               f"at the default {DEFAULT_FREEZE} frozen layers the cache trains {speedup[DEFAULT_FREEZE]:.2f}x as fast "
               f"as recomputing once it serves every news: engine.frozen_cache={'true' if default_pays else 'false'} "
               "is the better default on this device")
    md = (f"# Frozen-prefix cache against recomputation\n\nDevice: {info['device']}; torch {info['torch']}. "
          f"Settings: `{' '.join(base)}`. Targets per second per epoch (median of the epoch's log windows after "
          "its first); epoch 1 fills the cache, later epochs are served from it. Command: "
          f"`python -m benchmarks.frozen_cache{' --quick' if quick else ''}`.\n\n"
          + md_table(header, table) + f"\n{verdict}.\n")
    write_results("frozen_cache_quick" if quick else "frozen_cache", payload, md)
    return payload


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.frozen_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny 6-layer random encoder on 300 users")
    p.add_argument("--freeze", default="", help="numbers of frozen layers (default 10,6,2; quick 4,2)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    info = machine()
    freezes = [int(k) for k in (a.freeze or ("4,2" if a.quick else "10,6,2")).split(",")]
    base = [*(QUICK if a.quick else BASE), f"train.epochs={a.epochs}"]
    rows, runs, payload = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        shared = [f"data.cache_dir={out / 'data_cache'}"]  # one synthetic data set and tokenizer for every run
        for k in freezes:
            rows[k] = {}
            for variant, flag in (("cache", "true"), ("recompute", "false")):
                name = f"freeze{k}_{variant}"
                print(f"{name}: running", flush=True)
                job = run(name, [*base, *shared, f"model.freeze_layers={k}", f"engine.frozen_cache={flag}"], out)
                stats = job["stats"]
                rows[k][variant] = {"epoch_targets_per_s": job["epoch_rates"],
                                    "targets_per_s": stats.get("clicks_per_second"),
                                    "frozen_news_computed": stats.get("frozen_news_computed"),
                                    "frozen_news_served": stats.get("frozen_news_served"),
                                    "peak_rss_mb": stats.get("peak_rss_mb"), "wall_seconds": stats.get("wall_seconds"),
                                    "amp": (job.get("config") or {}).get("train", {}).get("amp"),
                                    "chunk_tokens": (job.get("config") or {}).get("engine", {}).get("chunk_tokens"),
                                    "auc": job["metrics"].get("auc")}
                runs[name] = {k2: v for k2, v in job.items() if k2 != "log"}
                print(name, rows[k][variant], flush=True)
                payload = report(rows, runs, base, info, a.quick)
    print((Path(__file__).parent / "results" / f"frozen_cache{'_quick' if a.quick else ''}.md").read_text())
    return payload


if __name__ == "__main__":
    main()
