"""BusLM on long documents (SpeedyFeed Fig. 9): 1 ... 10 segments, speed, peak memory, agreement.

``python -m benchmarks.buslm [--quick] [--layers N] [--docs N]``

Documents: bodies of the synthetic default, tokenized with the encoder's tokenizer, kept when they hold
96-510 word pieces (so the unsegmented text fits MiniLM's 512 positions). With k segments each document is
cut into k consecutive pieces of near-equal length, each ``[CLS] piece [SEP]``, joined by the bus; k = 1 is
the unsegmented encoder. For every k, in a fresh process: forward+backward seconds per batch (median of
``--reps``), peak memory of the process above the loaded model (``ru_maxrss``; on CUDA the allocator's peak),
and the cosine between each document's news vector and its unsegmented vector (same parameters, eval mode).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, md_table, write_results

MIN_TOKENS, MAX_TOKENS = 96, 510


def load_model(layers: int, quick: bool):
    from speedyrec.build import build_context, build_model
    from speedyrec.config import load_config
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.models.buslm import BusLMNewsEncoder

    enc = (["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800",
            "data.synthetic_users=300"] if quick else ["model.encoder=auto", f"model.layers={layers}"])
    cfg = load_config(None, ["out_dir=/tmp/speedyrec_buslm_bench", "model.freeze_layers=0", "data.body_tokens=512",
                             *enc])
    ctx = build_context(cfg, DistInfo())
    model = build_model(cfg, ctx.parts, DistInfo())
    return BusLMNewsEncoder.from_news_encoder(model.news_encoder), ctx


def documents(ctx, n: int) -> list[list[int]]:
    """Word-piece ids (no special tokens) of the first n bodies with MIN_TOKENS..MAX_TOKENS pieces."""
    field = ctx.store.fields["body"]
    docs = []
    for row in range(len(field.offsets) - 1):
        ids = field.tokens[field.offsets[row]:field.offsets[row + 1]].tolist()  # content tokens, no specials
        if MIN_TOKENS <= len(ids) <= MAX_TOKENS:
            docs.append(ids)
        if len(docs) == n:
            break
    if len(docs) < n:
        raise SystemExit(f"only {len(docs)} bodies with {MIN_TOKENS}-{MAX_TOKENS} word pieces")
    return docs


def segmented(docs: list[list[int]], k: int, cls: int, sep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, k, T] ids and mask: each document cut into k consecutive near-equal pieces, [CLS] piece [SEP]."""
    pieces = []
    for ids in docs:
        bounds = [round(i * len(ids) / k) for i in range(k + 1)]
        pieces.append([[cls, *ids[bounds[i]:bounds[i + 1]], sep] for i in range(k)])
    t = max(len(p) for doc in pieces for p in doc)
    out = torch.zeros((len(docs), k, t), dtype=torch.long)
    mask = torch.zeros((len(docs), k, t), dtype=torch.bool)
    for n, doc in enumerate(pieces):
        for s, p in enumerate(doc):
            out[n, s, :len(p)] = torch.tensor(p)
            mask[n, s, :len(p)] = True
    return out, mask


def one(k: int, layers: int, quick: bool, n_docs: int, batch: int, reps: int, ref_path: Path) -> dict:
    """Measure k segments in this process (called in a fresh one per k)."""
    torch.manual_seed(0)
    enc, ctx = load_model(layers, quick)
    cls, sep = ctx.store.cls_id, ctx.store.sep_id
    docs = documents(ctx, n_docs)
    ids, mask = segmented(docs, k, cls, sep)
    with torch.no_grad():
        enc.eval()
        vecs = torch.cat([enc(ids[i:i + batch], mask[i:i + batch]) for i in range(0, n_docs, batch)])
    cuda = torch.cuda.is_available()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    enc.train()
    times = []
    for r in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        for i in range(0, n_docs, batch):
            enc(ids[i:i + batch], mask[i:i + batch]).sum().backward()
        if r:
            times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated() if cuda else
             (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024) / 2**20)
    out = {"segments": k, "seconds_per_epoch_of_docs": statistics.median(times), "peak_mib": peak,
           "tokens": int(mask.sum()), "padded_positions": int(mask.numel()), "width": int(mask.shape[-1])}
    if k == 1:
        torch.save(vecs, ref_path)
    else:
        ref = torch.load(ref_path)
        cos = torch.nn.functional.cosine_similarity(vecs, ref, dim=-1)
        out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.buslm", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 3 segment counts")
    p.add_argument("--layers", type=int, default=2, help="MiniLM layers (default 2, the student)")
    p.add_argument("--docs", type=int, default=None, help="documents (default 64; quick 8)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: measure one k, print JSON
    p.add_argument("--ref", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    n_docs = a.docs or (8 if a.quick else 64)
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.layers, a.quick, n_docs, a.batch, a.reps, Path(a.ref))))
        return {}
    info = machine()
    ks = [1, 2, 4] if a.quick else list(range(1, 11))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "unsegmented.pt"
        for k in ks:
            cmd = [sys.executable, "-m", "benchmarks.buslm", "--one", str(k), "--layers", str(a.layers), "--docs",
                   str(n_docs), "--batch", str(a.batch), "--reps", str(a.reps), "--ref", str(ref),
                   *(["--quick"] if a.quick else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"k={k} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            rows.append(json.loads(line[len("RESULT "):]))
            print(rows[-1], flush=True)
    base = rows[0]
    payload = {"machine": info, "quick": a.quick, "layers": a.layers, "docs": n_docs, "batch": a.batch,
               "tokens_range": [MIN_TOKENS, MAX_TOKENS], "rows": rows,
               "speedup_at_best": max(base["seconds_per_epoch_of_docs"] / r["seconds_per_epoch_of_docs"] for r in rows)}
    table = [[r["segments"], r["width"], f"{r['seconds_per_epoch_of_docs']:.2f}",
              f"{base['seconds_per_epoch_of_docs'] / r['seconds_per_epoch_of_docs']:.2f}x", f"{r['peak_mib']:.0f}",
              "1 (reference)" if r["segments"] == 1 else f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f}"] for r in rows]
    md = ["# BusLM: segments on long documents\n",
          f"Device: {info['device']}, torch {info['torch']}, {info['threads']} threads; commit {info.get('commit', '?')}. "
          f"Encoder: {'a tiny random BERT' if a.quick else f'the first {a.layers} layers of all-MiniLM-L6-v2'}, every "
          f"layer trained. {n_docs} synthetic bodies of {MIN_TOKENS}-{MAX_TOKENS} word pieces, batches of {a.batch}; "
          f"forward+backward of all documents, median of {a.reps}; peak memory above the loaded model; cosine of each "
          "news vector with the unsegmented one (same parameters).\n",
          md_table(["segments", "segment width", "fwd+bwd s", "speedup", "peak MiB", "cosine mean / min"], table)]

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
        k = [r["segments"] for r in rows]
        ax[0].plot(k, [r["seconds_per_epoch_of_docs"] for r in rows], marker="o")
        ax[0].set_ylabel("fwd+bwd seconds")
        ax[1].plot(k, [r["peak_mib"] for r in rows], marker="o", color="tab:orange")
        ax[1].set_ylabel("peak MiB")
        ax[2].plot(k[1:], [r["cosine_mean"] for r in rows[1:]], marker="o", color="tab:green")
        ax[2].set_ylabel("cosine to unsegmented")
        for x in ax:
            x.set_xlabel("segments")
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    write_results("buslm_quick" if a.quick else "buslm", payload, "\n".join(md), plot)
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
