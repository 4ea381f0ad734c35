"""Data efficiency (SpeedyFeed Eq. 1, Fig. 8): the share of real tokens among the token positions the encoder runs.

``python -m benchmarks.data_efficiency [--quick]``

Efficiency is a property of the layout alone, so no encoder runs here: one epoch of the engine's real batches is
formed (the DynamicBatcher with the run's settings) and every batch goes through the engine's real centralized
encoding and ``NewsInputs.encode`` with a stand-in encoder that returns zeros, so real and padded tokens are
counted by the very code that counts them in training (``valid_tokens`` / ``padded_tokens`` of stats.json).

Variants, each over the same epoch:
- fixed padding: every news occurrence padded to the fields' maximum length (no dedup, no length buckets);
- one bucket, no centralized encoding: batches padded to their longest news, each occurrence encoded;
- dynamic batching only: length buckets, each occurrence encoded at its bucket's width;
- centralized encoding only: fixed batches, but each distinct news encoded once, in length-sorted chunks, each
  padded to its own longest news (the engine itself always pairs it with dynamic batching);
- both (the default), and the best of a small sweep of buckets and chunk sizes.
Titles only on the synthetic default (MiniLM's tokenizer, ``data.title_tokens=30``), and BusLM (title, abstract,
body; 32 tokens each) on the SpeedyRec sample, where BusLM's segments are packed by their own lengths (and, for
comparison, padded to the widest segment of each call).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, md_table, write_results

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "speedyrec_example"


class _Counting(torch.nn.Module):
    """A stand-in news encoder: zeros out, and BusLM's packed size when asked to pack segments."""

    def __init__(self, pack_groups):
        super().__init__()
        self.pack_groups = pack_groups
        self.backbone = torch.nn.Module()

    def forward(self, ids, mask, extra_embeddings=None, start_states=None):
        return torch.zeros((ids.shape[0], 1))

    def padded_tokens(self, mask):
        from speedyrec.models.buslm import packed_tokens

        return packed_tokens(mask, self.pack_groups) if mask.dim() == 3 else mask.numel()


def efficiency(ctx, segments, *, dynamic: bool, dedup: bool, centralized: bool, buckets: int, chunk_tokens: int,
               pack_groups=8, epochs_units: int = 0) -> dict:
    from speedyrec.engine.batching import DynamicBatcher
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.engine.encode import CentralizedEncoder
    from speedyrec.models.news_inputs import NewsInputs
    from speedyrec.workflows.speedyfeed import build_sequences

    cfg, store = ctx.cfg, ctx.store
    inputs = NewsInputs(store, segments)
    model = torch.nn.Module()
    model.news_encoder = _Counting(pack_groups)
    seqs = build_sequences(ctx.data.train, store.num_news)
    batcher = DynamicBatcher(seqs, inputs.lengths(np.arange(store.num_news)), inputs.prepare,
                             token_budget=cfg.engine.token_budget, buckets=buckets, dynamic=dynamic, dedup=dedup,
                             autoregressive=True, max_history=cfg.data.max_history, negatives=cfg.engine.negatives,
                             batch_size=cfg.train.batch_size, fixed_width=inputs.max_len, seed=cfg.train.seed, rank=0,
                             world=1, chunk_context=cfg.engine.chunk_context)
    trim = dynamic or centralized  # centralized encoding pads each length-sorted chunk to its own longest news
    encoder = CentralizedEncoder(lambda tokens, rows: inputs.encode(model, tokens, rows, trim=trim), 1, DistInfo(),
                                 cache=None, global_dedup=False, chunk_tokens=chunk_tokens if centralized else None)
    valid = padded = batches = 0
    for batch in batcher.epoch(0):
        out = encoder(batch.news, batch.lengths, batch.tokens, 0)
        valid += out.counters["valid_tokens"]
        padded += out.counters["padded_tokens"]
        batches += 1
    return {"valid_tokens": int(valid), "padded_tokens": int(padded), "batches": batches,
            "data_efficiency": valid / max(valid + padded, 1)}


VARIANTS = (("fixed padding", dict(dynamic=False, dedup=False, centralized=False, buckets=1)),
            ("one bucket, no centralized encoding", dict(dynamic=True, dedup=False, centralized=False, buckets=1)),
            ("dynamic batching only", dict(dynamic=True, dedup=False, centralized=False, buckets=2)),
            ("centralized encoding only", dict(dynamic=False, dedup=True, centralized=True, buckets=1)),
            ("both (default)", dict(dynamic=True, dedup=True, centralized=True, buckets=2)))
SWEEP = [dict(buckets=b, chunk_tokens=c) for b in (2, 4) for c in (1024, 2048, 4096)]


def measure(overrides: list[str], segments, quick: bool) -> dict:
    from speedyrec.build import build_context
    from speedyrec.config import load_config
    from speedyrec.engine.distributed import DistInfo

    cfg = load_config(None, ["out_dir=/tmp/speedyrec_data_efficiency", *overrides])
    ctx = build_context(cfg, DistInfo())
    chunk = cfg.engine.chunk_tokens
    out = {name: efficiency(ctx, segments, chunk_tokens=chunk, **kw) for name, kw in VARIANTS}
    if segments:
        out["both, BusLM segments padded to the widest"] = efficiency(
            ctx, segments, dynamic=True, dedup=True, centralized=True, buckets=2, chunk_tokens=chunk, pack_groups=None)
    sweep = {} if quick else {f"buckets={s['buckets']}, chunk_tokens={s['chunk_tokens']}": efficiency(
        ctx, segments, dynamic=True, dedup=True, centralized=True, **s) for s in SWEEP}
    best = max([out["both (default)"], *sweep.values()], key=lambda r: r["data_efficiency"])
    return {"variants": out, "sweep": sweep, "best": best, "overrides": overrides}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.data_efficiency", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 synthetic users, no sweep")
    a = p.parse_args(argv)
    info = machine()
    titles = measure(["model.encoder=auto", "data.title_tokens=30",
                      f"data.synthetic_users={300 if a.quick else 2000}"], None, a.quick)
    runs = {"titles": titles}
    if SAMPLE.is_dir():
        runs["buslm"] = measure(["model.encoder=auto", "data.format=speedyrec", f"data.dir={SAMPLE}",
                                 "data.title_tokens=32", "data.abstract_tokens=32", "data.body_tokens=32",
                                 "engine.buslm=true"], ["title", "abstract", "body"], a.quick)
    payload = {"machine": info, "quick": a.quick, "runs": runs, "best_titles": titles["best"]["data_efficiency"],
               "best_buslm": runs["buslm"]["best"]["data_efficiency"] if "buslm" in runs else None}
    md = ["# Data efficiency (SpeedyFeed Eq. 1): real tokens / token positions encoded\n",
          f"Device: {info['device']}. One epoch of the engine's batches per variant, counted by the engine's own "
          "encoding path with a stand-in encoder (efficiency depends on the layout only).\n"]
    for name, r in runs.items():
        what = ("Titles only, synthetic default (2,000 users), MiniLM tokenizer, 30-token titles" if name == "titles"
                else "BusLM (title, abstract, body; 32 tokens each), the SpeedyRec sample")
        rows = [[k, f"{v['data_efficiency']:.1%}", f"{v['valid_tokens']:,}", f"{v['padded_tokens']:,}", v["batches"]]
                for k, v in {**r["variants"], **r["sweep"]}.items()]
        md += [f"\n## {what}\n", md_table(["variant", "data efficiency", "real tokens", "padding", "batches"], rows),
               f"\nBest: {r['best']['data_efficiency']:.1%}.\n"]
    write_results("data_efficiency_quick" if a.quick else "data_efficiency", payload, "\n".join(md),
                  lambda path: plot(path, payload))
    print("\n".join(md))
    return payload


def plot(path, d: dict) -> None:
    """One bar per variant (the sweep's best as 'best'), a panel per setting, as in SpeedyFeed's Fig. 8."""
    import matplotlib.pyplot as plt

    runs = d["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], runs.items()):
        bars = {**r["variants"], "best of the sweep": r["best"]}
        ax.barh(list(bars)[::-1], [v["data_efficiency"] * 100 for v in bars.values()][::-1], color="tab:blue")
        ax.set_xlim(0, 100)
        ax.set_xlabel("data efficiency (%)")
        ax.set_title("titles, synthetic default" if name == "titles" else "BusLM, SpeedyRec sample", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
