"""Speedup of the SpeedyFeed workflow over the typical workflow, measured side by side in one run.

The synthetic default data (2,000 users), the 2-layer MiniLM student (all layers trained), one process.
SpeedyFeed trains a full epoch; the typical workflow trains for the same wall time (quality at equal
time) and its clicks/s is measured over that run. Both are evaluated on the same dev impressions.
Then a short ablation run per SpeedyFeed technique attributes the speedup (same number of steps each).

    python -m benchmarks.speedup [--quick] [--users N]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import machine, md_table, run_job, write_results

STUDENT = ["model.encoder=auto", "model.layers=2", "model.freeze_layers=0"]
TINY = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800"]

ABLATIONS = [
    ("speedyfeed", []),
    ("no cache", ["engine.cache=false"]),
    ("no dedup", ["engine.dedup=false"]),
    ("no dynamic batching", ["engine.dynamic_batching=false"]),
    ("no autoregressive loss", ["engine.autoregressive=false"]),
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users: checks the harness")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--ablation-steps", type=int, default=None)
    args = ap.parse_args(argv)
    users = args.users or (300 if args.quick else 2000)
    model = TINY if args.quick else STUDENT
    abl_steps = args.ablation_steps or (5 if args.quick else 15)
    base = [f"data.synthetic_users={users}", *model]
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sf = run_job("speedyfeed", base + ["train.workflow=speedyfeed"], root)
        wall = sf["stats"]["wall_seconds"]
        typ = run_job("typical", base + ["train.workflow=typical", f"train.max_seconds={wall:.1f}"], root)
        ablations = []
        for label, extra in ABLATIONS:
            job = run_job(label.replace(" ", "_"), base + ["train.workflow=speedyfeed", f"train.max_steps={abl_steps}",
                                                           "eval.max_impressions=1", *extra], root)
            ablations.append((label, job))
    s_sf, s_typ = sf["stats"], typ["stats"]
    ratio = s_sf["clicks_per_second"] / s_typ["clicks_per_second"]
    payload = {"machine": info, "users": users, "model": model, "speedyfeed": sf, "typical": typ,
               "speedup_clicks_per_second": ratio, "ablations": {k: v for k, v in ablations}}
    rows = []
    for label, job in (("typical (Recommenders)", typ), ("speedyfeed", sf)):
        s, m = job["stats"], job["metrics"]
        rows.append([label, f"{s['clicks_trained']:,}", f"{s['wall_seconds']:.0f}", f"{s['clicks_per_second']:.1f}",
                     f"{s['clicks_per_second'] / s_typ['clicks_per_second']:.1f}x", f"{s['data_efficiency']:.1%}",
                     f"{s['news_encoded']:,}", s["cache_hits"], _age(s), s["sequences_dropped"],
                     f"{m['auc']:.4f}", f"{m['ndcg10']:.4f}"])
    md = ["# Speedup: speedyfeed vs typical workflow\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads, one process. "
          f"Data: synthetic default, {users} users. Model: {' '.join(model)}. "
          f"SpeedyFeed trains one epoch; the typical workflow trains for the same wall time; both are evaluated on "
          f"the same {sf['metrics']['impressions']} dev impressions. Clicks/s = training targets per second of the training loop.\n",
          md_table(["workflow", "clicks trained", "train s", "clicks/s", "speedup", "data efficiency", "news encoded",
                    "cache hits", "served age mean/max (steps)", "dropped seqs", "AUC", "nDCG@10"], rows),
          f"\n**Speedup: {ratio:.1f}x** clicks per second.\n",
          f"\n## Ablation ({abl_steps} steps each, speedyfeed with one technique off)\n\n"]
    arows = []
    for label, job in ablations:
        s = job["stats"]
        arows.append([label, f"{s['clicks_per_second']:.1f}", f"{s['clicks_per_second'] / s_typ['clicks_per_second']:.1f}x",
                      f"{s['data_efficiency']:.1%}", f"{s['news_encoded'] / max(s['clicks_trained'], 1):.2f}",
                      f"{s['cache_hits'] / max(s['cache_lookups'], 1):.1%}"])
    md.append(md_table(["variant", "clicks/s", "vs typical", "data efficiency", "news encoded per click", "cache hit rate"], arows))
    md.append(f"\nTypical workflow for reference: {s_typ['clicks_per_second']:.2f} clicks/s, data efficiency "
              f"{s_typ['data_efficiency']:.1%}.\n")

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        labels = ["typical"] + [l for l, _ in ablations]
        cps = [s_typ["clicks_per_second"]] + [j["stats"]["clicks_per_second"] for _, j in ablations]
        ax[0].barh(labels, cps, color=["grey"] + ["tab:blue"] * len(ablations))
        ax[0].set_xscale("log")
        ax[0].set_xlabel("clicks / second (log)")
        ax[0].invert_yaxis()
        de = [s_typ["data_efficiency"]] + [j["stats"]["data_efficiency"] for _, j in ablations]
        ax[1].barh(labels, de, color=["grey"] + ["tab:green"] * len(ablations))
        ax[1].set_xlim(0, 1)
        ax[1].set_xlabel("data efficiency")
        ax[1].invert_yaxis()
        fig.suptitle(f"speedyfeed vs typical: {ratio:.0f}x clicks/s ({info['device']})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    write_results("speedup_quick" if args.quick else "speedup", payload, "".join(md), plot)
    print("".join(md))
    return payload


def _age(stats: dict) -> str:
    """Mean and max age of the rows the cache served (n/a when it served none, e.g. the typical workflow)."""
    if stats.get("served_age_max") is None:
        return "n/a"
    return f"{stats['served_age_mean']:.1f} / {stats['served_age_max']:.0f}"


if __name__ == "__main__":
    main()

