"""The teacher bank: frozen teachers' news vectors, computed once in bulk and read by index.

A teacher that teaches is frozen, so its vector for a news never changes: a student step reads it
like a cache entry that never expires instead of running the teacher's PLM. Each teacher's vectors
live in a memory-mapped float32 array [num_news, D] keyed by the checksum of what the teacher's news vectors depend
on (news encoder, and frequency embedding with refined text), the token store's digest (refined text is other
tokens), the precision they were computed in and the BusLM segment layout, so a later run with the same teacher,
tokens, precision and layout reuses them. Building is
padding-free: news are grouped by exact token length, so every encoder call holds rows of one length,
and M teachers are encoded together through a :class:`SharedPrefixStack` (their common frozen layers
run once per news).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speedyrec.engine.distributed import DistInfo, all_gather_rows, barrier
from speedyrec.engine.precision import autocast_context, runs_bf16
from speedyrec.engine.runlog import progress
from speedyrec.models.backbone import eval_mode
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.shared_prefix import SharedPrefixStack

log = logging.getLogger("speedyrec.distill")


@dataclass
class BankBuild:
    news_encoded: int = 0  # news x teachers computed by this build (0: everything was stored already)
    valid_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


def equal_length_chunks(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Positions grouped by exact length, each group cut into chunks of at most ``max_tokens`` tokens
    (at least one row): an encoder call on a chunk needs no padding at all."""
    order = np.argsort(lengths, kind="stable")
    sorted_len = lengths[order]
    edges = np.flatnonzero(np.r_[True, sorted_len[1:] != sorted_len[:-1], True])
    chunks = []
    for a, b in zip(edges[:-1], edges[1:]):
        rows = max(1, max_tokens // max(int(sorted_len[a]), 1))
        chunks += [order[s : min(s + rows, b)] for s in range(a, b, rows)]
    return chunks


class TeacherBank:
    def __init__(self, directories: list[Path]):
        self.directories = directories
        self.vectors = [np.load(d / "vectors.npy", mmap_mode="r") for d in directories]
        self.filled = [np.load(d / "filled.npy") for d in directories]

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors[0].shape[1]

    def read(self, news: np.ndarray, device: torch.device) -> torch.Tensor:
        """news [U] ids -> the teachers' vectors [U, M, D] (float32)."""
        news = np.asarray(news, dtype=np.int64)
        assert all(f[news].all() for f in self.filled), "a news outside the bank was read"
        out = np.stack([v[news] for v in self.vectors], axis=1)
        return torch.from_numpy(out).to(device, non_blocking=True)

    @classmethod
    def open_or_build(cls, stack: SharedPrefixStack, checksums: list[str], inputs: NewsInputs, news: np.ndarray,
                      root: Path, dist: DistInfo, *, chunk_tokens: int = 4096, amp: str = "auto") -> tuple["TeacherBank", BankBuild]:
        """The bank of the stack's encoders (whose weights have the given checksums) for the news ``news``,
        built where missing. Collective: every rank calls it; each encodes a share, rank 0 writes."""
        t0 = time.perf_counter()
        store_key = inputs.store.digest()[:16]
        # the precision the vectors are computed in keys them too: a bf16 run does not read an fp32 bank, nor back
        precision = "bf16" if runs_bf16(dist.device, amp) else "fp32"
        # and the layout the news are read in: the same tokens cut into other BusLM segments are another input
        layout = "" if inputs.segments is None else \
            "-segments-" + hashlib.sha256(",".join(inputs.segments).encode()).hexdigest()[:8]
        dirs = [Path(root) / f"{c[:24]}-{store_key}-{precision}{layout}" for c in checksums]
        news = np.unique(np.asarray(news, dtype=np.int64))
        num_news, dim = inputs.store.num_news, stack.dim
        need = []
        for d in dirs:
            filled = np.load(d / "filled.npy") if (d / "filled.npy").exists() else np.zeros(num_news, dtype=bool)
            need.append(news[~filled[news]])
        todo = np.unique(np.concatenate(need)) if need else news
        build = BankBuild()
        if len(todo):
            which = [i for i, n in enumerate(need) if len(n)]
            sub = stack if len(which) == len(stack) else \
                SharedPrefixStack([stack.encoders[i] for i in which], [stack.frequencies[i] for i in which])
            ids, vecs, valid, padded = _encode_share(sub, inputs, todo, dist, chunk_tokens, amp)
            ids = torch.cat(all_gather_rows(torch.from_numpy(ids).to(dist.device))).cpu().numpy()
            vecs = torch.cat(all_gather_rows(vecs)).cpu().numpy()
            if dist.is_main:
                for j, i in enumerate(which):
                    _write(dirs[i], num_news, dim, ids, vecs[:, j])
            build = BankBuild(len(ids) * len(which), valid, padded, 0.0)
            barrier()
        build.seconds = time.perf_counter() - t0
        return cls(dirs), build


def _encode_share(stack: SharedPrefixStack, inputs: NewsInputs, news: np.ndarray, dist: DistInfo, chunk_tokens: int,
                  amp: str) -> tuple[np.ndarray, torch.Tensor, int, int]:
    """This rank's share of the chunks: (news ids [R], vectors [R, M, D] on the device, valid, padded tokens)."""
    chunks = equal_length_chunks(inputs.lengths(news), chunk_tokens)[dist.rank :: dist.world]
    ids, parts, valid, padded = [], [], 0, 0
    first = stack.encoders[0]  # BusLM processes its segments packed: absent segments are not padding it computes
    positions = first.padded_tokens if hasattr(first, "padded_tokens") else (lambda mask: mask.numel())
    bar = progress(len(news), f"teacher bank ({len(stack)} teachers)", "news", enabled=dist.is_main)
    with torch.no_grad(), eval_mode(stack), autocast_context(dist.device, amp):
        for rows in chunks:
            tokens = inputs.prepare(news[rows]).to(dist.device)
            # the stack's caches, if on
            parts.append(stack(tokens.input_ids, tokens.mask, news[rows], tokens.counts).float())
            v = int(tokens.mask.sum())
            valid, padded = valid + v, padded + positions(tokens.mask) - v
            ids.append(news[rows])
            bar.update(len(rows) * dist.world)  # rank 0's share, scaled: the ranks' shares are alike
    bar.close()
    if not parts:
        return np.zeros(0, dtype=np.int64), torch.zeros((0, len(stack), stack.dim), device=dist.device), 0, 0
    return np.concatenate(ids), torch.cat(parts), valid, padded


def _write(directory: Path, num_news: int, dim: int, ids: np.ndarray, vectors: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path, filled_path = directory / "vectors.npy", directory / "filled.npy"
    if path.exists():
        arr = np.load(path, mmap_mode="r+")
        filled = np.load(filled_path)
    else:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_news, dim))
        filled = np.zeros(num_news, dtype=bool)
    arr[ids] = vectors
    arr.flush()
    del arr
    filled[ids] = True
    tmp = directory / "filled.tmp.npy"
    np.save(tmp, filled)
    tmp.replace(filled_path)  # written last: a bank is only as complete as its filled mask says
