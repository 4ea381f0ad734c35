"""Loading the tokenized news store: a million news, built once, then memory-mapped.

    python -m benchmarks.token_store [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, md_table, write_results
from speedyrec.data.token_store import TokenStore, build_or_load_field
from speedyrec.models.backbone import train_wordpiece_tokenizer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 100_000 if args.quick else 1_000_000
    rng = np.random.default_rng(0)
    words = np.array("market team storm vote film recipe season coach rally budget court vaccine album".split())
    texts = [" ".join(words[rng.integers(0, len(words), rng.integers(6, 16))]) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_wordpiece_tokenizer(texts[:5000], 500, Path(tmp) / "wp.json")
        t0 = time.perf_counter()
        field, built = build_or_load_field(Path(tmp), "title", texts, tok, 30)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        field, built_again = build_or_load_field(Path(tmp), "title", texts, tok, 30)
        load_s = time.perf_counter() - t0
        assert built and not built_again
        store = TokenStore({"title": field}, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
        idx = rng.integers(0, n, 4096)
        t0 = time.perf_counter()
        for _ in range(20):
            store.concat(idx)
        batch_ms = (time.perf_counter() - t0) / 20 * 1000
        tokens = int(field.offsets[-1])
    payload = {"machine": machine(), "news": n, "tokens": tokens, "build_seconds": build_s, "load_seconds": load_s,
               "assemble_4096_news_ms": batch_ms}
    md = (f"# Token store\n\n{n:,} news ({tokens:,} tokens), WordPiece, title field (30 tokens), {payload['machine']['device']}.\n"
          "Load = cache key (hash of the texts) + memory-mapping two arrays; assembly = padded ids and mask for "
          "4,096 random news.\n\n" + md_table(["build (tokenize once)", "load", "assemble 4,096 news"],
                                             [[f"{build_s:.1f} s", f"{load_s:.2f} s", f"{batch_ms:.1f} ms"]]))
    write_results("token_store_quick" if args.quick else "token_store", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
