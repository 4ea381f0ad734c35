"""Would a columnar reader parse MIND's logs faster than ours? pyarrow and polars against speedyrec's bulk reader.

Issue 31 asked for a columnar reader such as pyarrow or polars where it beats what numpy alone does, measured.
Each reader here turns one ``behaviors.tsv`` into the arrays our reader gives (:class:`Behaviors`): users numbered
in order of first appearance, times in seconds, histories and candidates as news indices (ragged), labels, rows
sorted by time (stable). The columnar readers do it with their own kernels: a CSV read of the five columns, a split
of the id lists, a hash lookup of every id in the news table (pyarrow ``index_in``, a polars join), ``strptime``;
the sort and the ragged gathers are numpy's, as ours. Their arrays are checked equal to ours before any is timed.

What the columnar readers do not do, and ours does: count and name bad rows, unknown ids, glued ids and bad
stamps line by line (``stats.json``'s fault counters), spool the parse into the parse cache, keep a dev log's
listing. On these logs every line is plain, so their time is a lower bound for a reader built on them.

Used by ``python -m benchmarks.scale`` (its ``columnar`` rows; ``--columnar-only`` measures these alone).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

COLUMNS = ["impression", "user", "time", "history", "impressions"]
STAMP = "%m/%d/%Y %I:%M:%S %p"


def _ragged(lengths: np.ndarray, values: np.ndarray):
    from speedyrec.data.ragged import Ragged

    return Ragged.from_lengths(np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.int32))


def _sorted(user: np.ndarray, stamps: np.ndarray, h_len, h_val, c_len, c_val, labels) -> dict:
    """The arrays in our reader's order: rows sorted by time, stable (numpy's sort and gathers, as ours)."""
    from speedyrec.data.ragged import Ragged

    order = np.argsort(stamps, kind="stable")
    cand = _ragged(c_len, c_val)
    return {"user": user.astype(np.int64)[order], "time": stamps.astype(np.int64)[order],
            "history": _ragged(h_len, h_val).take(order), "candidates": cand.take(order),
            "labels": Ragged(cand.offsets, labels.astype(np.int8)).take(order).values}


def arrow_parse(path: Path, news_ids: list[str], threads: bool = True) -> dict:
    """pyarrow: the CSV reader, ``split_pattern``, ``index_in`` against the news ids, ``strptime``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=COLUMNS, use_threads=threads),
                          parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                          convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                                              strings_can_be_null=False))
    ids = pa.array(news_ids)

    def lookup(col):  # tokens of a space-separated column -> (lengths per row, their indices); "" is no token
        lists = pc.split_pattern(table[col].combine_chunks(), " ")
        tokens = pc.list_flatten(lists)
        rows = pc.list_parent_indices(lists).to_numpy()
        keep = pc.not_equal(tokens, "").to_numpy(zero_copy_only=False)
        return tokens, rows, keep

    h_tok, h_rows, h_keep = lookup("history")
    n = table.num_rows
    h_idx = pc.index_in(h_tok, value_set=ids).to_numpy(zero_copy_only=False)
    c_tok, c_rows, c_keep = lookup("impressions")
    labels = pc.ends_with(c_tok, "-1").to_numpy(zero_copy_only=False)
    c_idx = pc.index_in(pc.utf8_slice_codeunits(c_tok, 0, -2), value_set=ids).to_numpy(zero_copy_only=False)
    stamps = pc.cast(pc.strptime(table["time"], format=STAMP, unit="s"), pa.int64()).to_numpy()
    user = pc.dictionary_encode(table["user"].combine_chunks()).indices.to_numpy()
    return _sorted(user, np.asarray(stamps), np.bincount(h_rows[h_keep], minlength=n), h_idx[h_keep],
                   np.bincount(c_rows[c_keep], minlength=n), c_idx[c_keep], labels[c_keep])


def polars_parse(path: Path, news_ids: list[str]) -> dict:
    """polars: its CSV reader, ``str.split`` + ``explode``, a join against the news ids, ``str.strptime``."""
    import polars as pl

    df = pl.read_csv(path, separator="\t", has_header=False, new_columns=COLUMNS, quote_char=None,
                     schema_overrides={c: pl.Utf8 for c in COLUMNS})
    ids = pl.DataFrame({"token": news_ids, "index": np.arange(len(news_ids), dtype=np.int32)})
    n = df.height

    def tokens(col):  # (row, token) of every non-empty token of a space-separated column, in order
        return (df.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), pl.col(col).str.split(" ").alias("token"))
                .explode("token").filter(pl.col("token") != ""))

    h = tokens("history").join(ids, on="token", how="left", maintain_order="left")
    c = tokens("impressions")
    c = c.with_columns(pl.col("token").str.ends_with("-1").alias("label"),
                       pl.col("token").str.head(-2)).join(ids, on="token", how="left", maintain_order="left")
    # users numbered in order of first appearance (a Categorical's codes are not, once polars reads in parallel)
    users = df.select(pl.col("user").unique(maintain_order=True)).with_row_index("code")
    meta = df.select("user", pl.col("time").str.strptime(pl.Datetime("ms"), STAMP).dt.epoch("s").alias("time")) \
        .join(users, on="user", how="left", maintain_order="left")
    h_rows, c_rows = h["row"].to_numpy(), c["row"].to_numpy()
    return _sorted(meta["code"].to_numpy(), meta["time"].to_numpy(), np.bincount(h_rows, minlength=n),
                   h["index"].to_numpy(), np.bincount(c_rows, minlength=n), c["index"].to_numpy(),
                   c["label"].to_numpy())


def ours_parse(path: Path, news) -> dict:
    """speedyrec's bulk reader, as the rank that parses runs it (no spool: the parse itself)."""
    from speedyrec.data.behaviors import read_mind_behaviors
    from speedyrec.data.faults import FaultLog

    b = read_mind_behaviors([path], news, FaultLog(), 1 << 20)
    return {"user": b.user, "time": b.time, "history": b.history, "candidates": b.candidates, "labels": b.labels}


def same(a: dict, b: dict) -> list[str]:
    """The fields on which two parses differ (none: equal arrays)."""
    bad = []
    for k in ("user", "time", "labels"):
        if not np.array_equal(np.asarray(a[k], dtype=np.int64), np.asarray(b[k], dtype=np.int64)):
            bad.append(k)
    for k in ("history", "candidates"):
        if not (np.array_equal(a[k].offsets, b[k].offsets)
                and np.array_equal(np.asarray(a[k].values, np.int64), np.asarray(b[k].values, np.int64))):
            bad.append(k)
    return bad


READERS = ("speedyrec", "pyarrow", "pyarrow_1_thread", "polars")


def timed_everywhere(rows: list[dict]) -> list[str]:
    """The readers timed at every size of ``rows`` (``measure``'s results), ours first; one refused at some size
    (its arrays differed) is not among them."""
    return [n for n in READERS if rows and all(n in r["us_per_line"] for r in rows)]


def ratios(rows: list[dict]) -> dict[str, float]:
    """Each columnar reader timed at every size: its time per line over ours, median over the sizes."""
    import statistics

    return {n: statistics.median(r["us_per_line"][n] / r["us_per_line"]["speedyrec"] for r in rows)
            for n in timed_everywhere(rows) if n != "speedyrec"}


def available() -> dict[str, bool]:
    out = {}
    for name in ("pyarrow", "polars"):
        try:
            __import__(name)
            out[name] = True
        except ImportError:
            out[name] = False
    return out


def measure(path: Path, news, rounds: int = 3) -> dict:
    """Seconds per parse of ``path`` (the best of ``rounds``, readers interleaved round by round) for our reader and
    each columnar reader installed, after checking its arrays equal ours. Readers whose arrays differ are reported,
    not timed."""
    have = available()
    readers = {"speedyrec": lambda: ours_parse(path, news)}
    if have["pyarrow"]:
        readers["pyarrow"] = lambda: arrow_parse(path, news.ids, threads=True)
        readers["pyarrow_1_thread"] = lambda: arrow_parse(path, news.ids, threads=False)
    if have["polars"]:
        readers["polars"] = lambda: polars_parse(path, news.ids)
    ref = readers["speedyrec"]()
    differs = {}
    for name, fn in list(readers.items())[1:]:
        bad = same(fn(), ref)
        if bad:
            differs[name] = bad
            del readers[name]
    best = {name: float("inf") for name in readers}
    for _ in range(rounds):
        for name, fn in readers.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {"seconds": best, "differs": differs, "missing": [k for k, v in have.items() if not v],
            "lines": int(len(ref["user"])), "bytes": Path(path).stat().st_size}
