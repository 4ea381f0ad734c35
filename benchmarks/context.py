"""What a long user's chunks gain from context: ``engine.chunk_context`` on against off, side by side.

``python -m benchmarks.context [--quick] [--seeds 0,1]``

The autoregressive loss cuts a user's sequence into chunks of ``data.max_history`` target clicks. Without
context a chunk starts from an empty user state, so the targets at its start are predicted from almost no
history, although evaluation always sees the last ``data.max_history`` clicks. With context a chunk is led by
up to ``data.max_history`` earlier clicks that are not targets. Both runs train the main job (one epoch of the
synthetic default, MiniLM with its top 2 layers trained) with the same seed and the same targets; the table
gives the dev AUC and what context costs: user-encoder positions, news encoded and the training loop's time.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import machine, md_table, run_job, write_results

QUICK = ["data.synthetic_users=300", "eval.max_impressions=200"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.context", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 users")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    info = machine()
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        for seed in seeds:
            for ctx in (False, True):  # the two settings of a seed run back to back, under the same load
                name = f"context_{str(ctx).lower()}_seed{seed}"
                job = run_job(name, [f"engine.chunk_context={str(ctx).lower()}", f"train.seed={seed}",
                                     *(QUICK if a.quick else [])], root, timeout=4 * 3600)
                runs[name] = {"context": ctx, "seed": seed, "command": job["command"], "stats": job["stats"],
                              "metrics": job["metrics"]}
    rows, summary = [], {}
    for ctx in (False, True):
        mine = [r for r in runs.values() if r["context"] == ctx]
        auc = [r["metrics"]["auc"] for r in mine]
        wall = [r["stats"]["wall_seconds"] for r in mine]
        summary[str(ctx).lower()] = {"auc_mean": statistics.mean(auc), "auc_per_seed": auc,
                                     "wall_seconds_mean": statistics.mean(wall),
                                     "news_encoded_mean": statistics.mean(r["stats"]["news_encoded"] for r in mine),
                                     "clicks_trained": mine[0]["stats"]["clicks_trained"]}
        for r in mine:
            s, m = r["stats"], r["metrics"]
            rows.append(["on" if ctx else "off", r["seed"], f"{s['clicks_trained']:,}", f"{s['news_encoded']:,}",
                         f"{s['wall_seconds']:.0f}", f"{m['auc']:.4f}", f"{m['mrr']:.4f}", f"{m['ndcg10']:.4f}"])
    on, off = summary["true"], summary["false"]
    paired = [a_ - b_ for a_, b_ in zip(on["auc_per_seed"], off["auc_per_seed"])]
    payload = {"machine": info, "quick": a.quick, "runs": runs, "summary": summary,
               "auc_gain_per_seed": paired, "auc_gain_mean": statistics.mean(paired),
               "time_ratio": on["wall_seconds_mean"] / off["wall_seconds_mean"]}
    md = ["# Chunk context: a long user's chunk led by earlier clicks (engine.chunk_context)\n",
          f"Device: {info['device']}, torch {info['torch']}. Main job (`python -m speedyrec.train "
          f"engine.chunk_context=...`{', quick settings' if a.quick else ''}), one epoch, seeds {a.seeds}; "
          "the same training targets either way.\n",
          md_table(["context", "seed", "targets trained", "news encoded", "train s", "AUC", "MRR", "nDCG@10"], rows),
          f"\nAUC gain of context, paired by seed: {', '.join(f'{100 * g:+.2f}' for g in paired)} points "
          f"(mean {100 * payload['auc_gain_mean']:+.2f}); training time with context "
          f"{payload['time_ratio']:.2f}x without.\n"]
    write_results("context_quick" if a.quick else "context", payload, "\n".join(md))
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
