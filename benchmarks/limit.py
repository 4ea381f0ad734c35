"""How close the engine trains to the hardware's limit: the encoder's raw throughput against the engine's.

``python -m benchmarks.limit [--quick] [--steps N]``

- Raw: the news encoder (the 2-layer MiniLM student, every layer trained) on fully packed batches, every row
  exactly ``--width`` real tokens (no padding, no data pipeline, no user encoder, no optimizer): forward and
  backward of the summed news vectors, in tokens per second, the best of 5 blocks. Batches hold
  ``engine.chunk_tokens`` tokens, the size the engine encodes at once. Measured before and after the engine
  run; the mean is the limit. It runs on the engine run's device and in its precision (``train.amp`` resolved
  the same way: bf16 autocast on a CPU with native bf16), with the word-embedding gather the engine uses, so the
  fraction compares like with like.
- Engine: ``python -m speedyrec.train`` with the same student for ``--steps`` steps on the synthetic default:
  useful tokens per second = the real tokens of the news it encoded (``valid_tokens``) over the training loop's
  seconds (``wall_seconds``), which include everything else a step does.

``engine_fraction_of_limit`` = engine / raw. The same process count and threads for both.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, md_table, run_job, write_results

STUDENT = ["model.encoder=auto", "model.layers=2", "model.freeze_layers=0"]
TINY = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800"]


def raw_throughput(overrides: list[str], width: int, chunk_tokens: int, iters: int) -> tuple[float, str, str]:
    """(tokens per second of the news encoder's forward+backward on packed [chunk_tokens / width, width] batches,
    device, precision), on the device and in the precision a run with these overrides resolves."""
    from speedyrec.build import build_model
    from speedyrec.config import load_config
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.engine.precision import autocast_context
    from speedyrec.recipes.common import build_context

    cfg = load_config(None, ["out_dir=/tmp/speedyrec_limit", *overrides])
    dist = DistInfo(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    ctx = build_context(cfg, dist)  # resolves train.amp as the run does
    model = build_model(cfg, ctx.parts, dist).train()
    rows = max(chunk_tokens // width, 1)
    g = torch.Generator().manual_seed(0)
    vocab = model.news_encoder.backbone.embeddings.word_embeddings.num_embeddings
    ids_host = torch.randint(1000 if vocab > 2000 else 5, vocab, (rows, width), generator=g)
    ids, mask = ids_host.to(dist.device), torch.ones((rows, width), dtype=torch.bool, device=dist.device)
    words = np.unique(ids_host.numpy())
    backbone = model.news_encoder.backbone

    def once():
        with backbone.word_vocabulary(words), autocast_context(dist.device, cfg.train.amp):
            out = model.news_encoder(ids, mask, dense=True)
        out.float().sum().backward()

    def sync():
        if dist.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm up
        once()
    best = 0.0
    for _ in range(5):  # the best of 5 blocks: the limit is what the hardware can do, not what a busy moment allows
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        sync()
        best = max(best, rows * width * iters / (time.perf_counter() - t0))
    return best, dist.device.type, "bf16" if cfg.train.amp == "bf16" else "float32"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.limit", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users")
    p.add_argument("--steps", type=int, default=None, help="engine steps (default 40; quick 5)")
    p.add_argument("--width", type=int, default=16, help="tokens per row of the raw batches")
    a = p.parse_args(argv)
    model = TINY if a.quick else STUDENT
    users = 300 if a.quick else 2000
    steps = a.steps or (5 if a.quick else 40)
    base = [f"data.synthetic_users={users}", *model]
    info = machine()
    chunk = 2048
    iters = 2 if a.quick else 8
    before, device, precision = raw_throughput(base, a.width, chunk, iters)
    with tempfile.TemporaryDirectory() as tmp:
        job = run_job("engine", [*base, f"train.max_steps={steps}", "eval.max_impressions=1"], Path(tmp))
    after, _, _ = raw_throughput(base, a.width, chunk, iters)
    raw = statistics.mean([before, after])
    s = job["stats"]
    if (s["device"], s["precision"]) != (device, precision):
        raise SystemExit(f"the engine ran on {s['device']} in {s['precision']}, the raw limit on {device} in "
                         f"{precision}: they must match")
    engine = s["valid_tokens"] / s["wall_seconds"]
    payload = {"machine": info, "quick": a.quick, "model": model, "width": a.width, "chunk_tokens": chunk,
               "device": device, "precision": precision,
               "raw_tokens_per_second": raw, "raw_before": before, "raw_after": after,
               "engine_useful_tokens_per_second": engine, "engine_fraction_of_limit": engine / raw,
               "engine": {"command": job["command"], "stats": s}}
    rows = [["raw encoder fwd+bwd, packed", f"{raw:,.0f}", f"before {before:,.0f}, after {after:,.0f}"],
            ["engine, useful tokens", f"{engine:,.0f}",
             f"{s['valid_tokens']:,} real tokens encoded in {s['wall_seconds']:.1f} s, {steps} steps, data efficiency "
             f"{s['data_efficiency']:.1%}"]]
    md = ["# The hardware limit and the engine\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Model: `{' '.join(model)}`. Both measured on {device} in {precision}.\n",
          md_table(["", "tokens/s", "how"], rows),
          f"\n**The engine trains at {engine / raw:.0%} of the encoder's raw throughput.**\n"]
    write_results("limit_quick" if a.quick else "limit", payload, "\n".join(md), lambda path: plot(path, payload))
    print("\n".join(md))
    return payload


def plot(path, d: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 2.4))
    names = ["engine, useful tokens", "raw encoder, packed"]
    ax.barh(names, [d["engine_useful_tokens_per_second"], d["raw_tokens_per_second"]], color=["tab:green", "tab:gray"])
    ax.set_xlabel("tokens per second (forward + backward)")
    ax.set_title(f"the engine at {d['engine_fraction_of_limit']:.0%} of the raw limit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
