"""Parsed impression logs kept on disk, so that a log is parsed once, not by every rank at every start.

A parsed log is a handful of flat arrays (:class:`~speedyrec.data.behaviors.Behaviors`): they are written as
``.npy`` files (no pickle) into ``<data.cache_dir>/behaviors/<key>/`` and read back memory-mapped. The key covers
what decides the arrays: each file's path, size, modification time and a digest of its first and last MiB, the
news table's ids in order (they decide every index), the reader's settings and this module's version. The fault
counters and examples the parse produced are kept beside the arrays and replayed into the run's FaultLog, so
``stats.json`` counts the same faults whether the log was parsed or read from the cache.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from speedyrec.data.behaviors import Behaviors, Listing
from speedyrec.data.faults import FaultLog
from speedyrec.data.news import NewsTable
from speedyrec.data.ragged import Ragged

VERSION = 1
_EDGE = 1 << 20


def file_fingerprint(path: Path) -> dict:
    """Path, size, modification time and a digest of the first and last MiB."""
    path = Path(path).resolve()
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > 2 * _EDGE:
            f.seek(st.st_size - _EDGE)
            h.update(f.read(_EDGE))
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def cache_key(paths: list[Path], news: NewsTable, settings: dict) -> str:
    ids = hashlib.sha256("\n".join(news.ids).encode()).hexdigest()
    src = json.dumps({"v": VERSION, "files": [file_fingerprint(p) for p in paths], "news": ids, **settings},
                     sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:24]


_ARRAYS = ("user", "time", "history.offsets", "history.values", "candidates.offsets", "candidates.values", "labels",
           "unknown_clicks")
_LISTING = ("ids", "file_row", "slots.offsets", "slots.values", "candidate_slot")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _aside(directory: Path) -> Path:
    return directory.with_name(directory.name + f".tmp{os.getpid()}")


def save(directory: Path, beh: Behaviors, faults_added: dict) -> None:
    """Write ``beh`` and the faults its parse added into ``directory`` (written aside, then renamed). Arrays whose
    files a spooling parse wrote aside already (:class:`speedyrec.data.behaviors._Spool`) are kept."""
    tmp = _aside(directory)
    tmp.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        if not (tmp / f"{name}.npy").is_file():
            np.save(tmp / f"{name}.npy", _get(beh, name), allow_pickle=False)
    if beh.listing is not None:
        for name in _LISTING:
            if not (tmp / f"listing.{name}.npy").is_file():
                np.save(tmp / f"listing.{name}.npy", _get(beh.listing, name), allow_pickle=False)
    meta = {"users": beh.users, "history_is_prefix": beh.history_is_prefix, "listing": beh.listing is not None,
            "faults": faults_added}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, directory)
    except OSError:  # another process of this node wrote it first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)


def load(directory: Path) -> tuple[Behaviors, dict]:
    meta = json.loads((directory / "meta.json").read_text())
    return mapped(directory, meta["users"], meta["history_is_prefix"], meta["listing"]), meta["faults"]


def mapped(directory: Path, users: list[str], history_is_prefix: bool, listing: bool) -> Behaviors:
    """The Behaviors whose arrays are the ``.npy`` files in ``directory`` (the cache's, or a spooling parse's before
    it is renamed into place), mapped read-only."""
    a = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}
    lst = None
    if listing:
        b = {name: np.load(directory / f"listing.{name}.npy", mmap_mode="r", allow_pickle=False) for name in _LISTING}
        lst = Listing(b["ids"], b["file_row"], Ragged(b["slots.offsets"], b["slots.values"]), b["candidate_slot"])
    return Behaviors(users, a["user"], a["time"], Ragged(a["history.offsets"], a["history.values"]),
                     Ragged(a["candidates.offsets"], a["candidates.values"]), a["labels"], a["unknown_clicks"],
                     history_is_prefix, lst)


def drop_pages(*arrays) -> None:
    """Hand the pages of file-mapped arrays back to the system: they leave this process's resident memory and stay
    in the page cache (written back first where they were written: a shared file mapping keeps its data), from
    where a later touch reads them again. Arrays in memory are left alone."""
    for arr in arrays:
        m = getattr(arr, "_mmap", None) if isinstance(arr, np.memmap) else None
        if m is not None and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)


def release(beh: Behaviors) -> None:
    """:func:`drop_pages` of ``beh``'s arrays mapped from the cache (the node's other ranks read the same pages)."""
    drop_pages(*(_get(beh, name) for name in _ARRAYS))


def _snapshot(faults: FaultLog) -> tuple[dict, dict]:
    return dict(faults.counts), {k: list(v) for k, v in faults.examples.items()}


def _added(faults: FaultLog, before: tuple[dict, dict]) -> dict:
    counts, examples = before
    return {k: {"n": int(n - counts.get(k, 0)), "examples": faults.examples.get(k, [])[len(examples.get(k, [])):]}
            for k, n in faults.counts.items() if n - counts.get(k, 0)}


def replay(faults: FaultLog, added: dict) -> None:
    """Add a cached parse's faults to ``faults``, as if the parse had run now."""
    for counter, entry in added.items():
        faults.counts[counter] += entry["n"]
        kept = faults.examples.setdefault(counter, [])
        kept.extend(entry["examples"][: max(faults.max_examples - len(kept), 0)])


def cached_read(read, paths: list[Path], news: NewsTable, faults: FaultLog, cache_dir: Path | None,
                settings: dict) -> Behaviors:
    """``read(paths, news, faults, spool)`` through the cache in ``cache_dir`` (None, or a strict FaultLog: no cache;
    a strict run must stop at the first fault in file order, which only a parse finds). ``spool``: the folder the
    cache's files are written in before it is renamed into place (None without a cache); a reader may put its
    arrays there itself, as ``<name>.npy``."""
    if cache_dir is None or faults.strict:
        return read(paths, news, faults, None)
    directory = Path(cache_dir) / "behaviors" / cache_key(paths, news, settings)
    if (directory / "meta.json").is_file():
        beh, added = load(directory)
        replay(faults, added)
        return beh
    before = _snapshot(faults)
    tmp = _aside(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    beh = read(paths, news, faults, tmp)  # a reader may write its arrays there as it parses
    directory.parent.mkdir(parents=True, exist_ok=True)
    save(directory, beh, _added(faults, before))
    del beh  # the rank that parsed reads the arrays mapped, as the others do: its parse's memory goes back
    return load(directory)[0]
