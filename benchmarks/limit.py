"""How close the engine trains to the hardware's limit: the encoder's raw throughput against the engine's.

``python -m benchmarks.limit [--quick] [--steps N]``

- Raw: the news encoder (the 2-layer MiniLM student, every layer trained) alone on the news the engine trains on,
  sampled as often as the training log mentions them (histories and impressions), grouped by exact length into
  chunks of at most ``engine.chunk_tokens`` tokens, so no row holds a padding token: forward and backward of the
  summed news vectors (no data pipeline, no cache, no user encoder, no loss, no optimizer), in real tokens per
  second, the best of 5 blocks after a warm-up. The same tokens as the engine's, at zero padding: what the encoder
  could do with them and nothing else. Measured before and after the engine run; the mean is the limit.
- Engine: ``python -m speedyrec.train`` with the same student for ``--steps`` steps on the synthetic default: real
  tokens encoded per second (``valid_tokens``) over the training loop's seconds, which include everything else a
  step does; ``steady`` reads it from the log's windows after the first (the warm-up the raw limit also leaves
  out), ``whole run`` over all steps.

Both run on the same device and in the same precision: ``train.amp`` resolved as a run resolves it (bf16 autocast on
a CPU with native bf16), with the engine's word-embedding gather. ``engine_fraction_of_limit`` = steady engine /
raw; ``engine_fraction_of_limit_whole_run`` beside it. The same process count and threads for both.
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


def exact_length_chunks(lengths: np.ndarray, chunk_tokens: int) -> list[np.ndarray]:
    """Positions of ``lengths`` grouped by exact length, each group cut into chunks of at most ``chunk_tokens``
    tokens (at least one row)."""
    order = np.argsort(lengths, kind="stable")
    chunks = []
    for length in np.unique(lengths):
        rows = order[lengths[order] == length]
        per = max(chunk_tokens // int(length), 1)
        chunks += [rows[i : i + per] for i in range(0, len(rows), per)]
    return chunks


def raw_throughput(overrides: list[str], chunk_tokens: int, block_tokens: int) -> tuple[float, str, str, float]:
    """(real tokens per second of the news encoder's forward+backward on exact-length chunks of the log's news,
    device, precision, mean tokens per news), on the device and in the precision a run with these overrides resolves."""
    from speedyrec.build import build_context, build_model
    from speedyrec.config import load_config
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.engine.precision import autocast_context
    from speedyrec.models.news_inputs import NewsInputs

    cfg = load_config(None, ["out_dir=/tmp/speedyrec_limit", *overrides])
    dist = DistInfo(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    ctx = build_context(cfg, dist)  # resolves train.amp as the run does
    model = build_model(cfg, ctx.parts, dist).train()
    inputs = NewsInputs(ctx.store)
    train = ctx.data.train
    mentions = np.concatenate([train.history.values, train.candidates.values]).astype(np.int64)
    rng = np.random.default_rng(0)
    news = rng.choice(mentions, size=max(block_tokens // 8, 64))
    lengths = inputs.lengths(news)
    news = news[: int(np.searchsorted(np.cumsum(lengths), block_tokens)) + 1]  # about block_tokens real tokens
    tokens = inputs.prepare(news).to(dist.device)
    chunks = exact_length_chunks(tokens.row_lengths(), chunk_tokens)
    real = int(tokens.row_lengths().sum())

    def block():
        with inputs.word_vocabulary(model, tokens), autocast_context(dist.device, cfg.train.amp):
            out = torch.cat([inputs.encode(model, tokens, rows)[0] for rows in chunks])
        out.float().sum().backward()

    def sync():
        if dist.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm up
        block()
    best = 0.0
    for _ in range(5):  # the best of 5 blocks: the limit is what the hardware can do, not what a busy moment allows
        sync()
        t0 = time.perf_counter()
        block()
        sync()
        best = max(best, real / (time.perf_counter() - t0))
    return best, dist.device.type, "bf16" if cfg.train.amp == "bf16" else "float32", real / len(news)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.limit", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users")
    p.add_argument("--steps", type=int, default=None, help="engine steps (default 60; quick 6)")
    a = p.parse_args(argv)
    model = TINY if a.quick else STUDENT
    users = 300 if a.quick else 2000
    steps = a.steps or (6 if a.quick else 60)
    every = max(steps // 6, 1)
    base = [f"data.synthetic_users={users}", *model]
    info = machine()
    chunk = 2048
    block = 12000  # real tokens per raw block: about one engine step's
    before, device, precision, per_news = raw_throughput(base, chunk, block)
    with tempfile.TemporaryDirectory() as tmp:
        job = run_job("engine", [*base, f"train.max_steps={steps}", "eval.max_impressions=1", f"train.log_every={every}"],
                      Path(tmp))
    after, _, _, _ = raw_throughput(base, chunk, block)
    raw = statistics.mean([before, after])
    s = job["stats"]
    if (s["device"], s["precision"]) != (device, precision):
        raise SystemExit(f"the engine ran on {s['device']} in {s['precision']}, the raw limit on {device} in "
                         f"{precision}: they must match")
    whole = s["valid_tokens"] / s["wall_seconds"]
    windows = job.get("log_tokens_per_second") or []
    steady = statistics.median(windows[1:]) if len(windows) > 1 else whole
    payload = {"machine": info, "quick": a.quick, "model": model, "chunk_tokens": chunk, "block_tokens": block,
               "device": device, "precision": precision, "tokens_per_news": per_news,
               "raw_tokens_per_second": raw, "raw_before": before, "raw_after": after,
               "engine_useful_tokens_per_second": steady, "engine_whole_run_tokens_per_second": whole,
               "engine_window_tokens_per_second": windows, "engine_fraction_of_limit": steady / raw,
               "engine_fraction_of_limit_whole_run": whole / raw, "engine": {"command": job["command"], "stats": s}}
    rows = [["raw encoder fwd+bwd, exact-length chunks of the log's news", f"{raw:,.0f}",
             f"before {before:,.0f}, after {after:,.0f}; {per_news:.1f} tokens per news"],
            ["engine, useful tokens, steady", f"{steady:,.0f}",
             f"median of the log windows after the first ({every} steps each): "
             + ", ".join(f"{w:,.0f}" for w in windows)],
            ["engine, useful tokens, whole run", f"{whole:,.0f}",
             f"{s['valid_tokens']:,} real tokens encoded in {s['wall_seconds']:.1f} s, {steps} steps, data efficiency "
             f"{s['data_efficiency']:.1%}"]]
    md = ["# The hardware limit and the engine\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Model: `{' '.join(model)}`. Both measured on {device} in {precision}.\n",
          md_table(["", "tokens/s", "how"], rows),
          f"\n**The engine trains at {steady / raw:.0%} of the encoder's raw throughput** ({whole / raw:.0%} over the "
          "whole run, warm-up included).\n"]
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
