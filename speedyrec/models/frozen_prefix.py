"""The frozen-prefix cache: the output of the frozen layers for each news, computed once per node and run.

With ``model.freeze_layers=K`` the embeddings and the first K layers never change, and they run in eval
mode (no dropout), so their output for a news is a pure function of its tokens. It is computed the first
time a news is encoded and read back afterwards, so a step runs only the trainable layers.

Storage: one flat array of the news' real-token states [total tokens, H] in a file-backed memory map (news at
fixed offsets), in the run's compute dtype: bfloat16 under bf16 autocast (half of float32's bytes; the next layer's
matrix products read their input in bf16 anyway, and a news is served the same rounded states whether it was just
computed or read back), else float32. Size: real tokens of all news x hidden x 2 (bf16) or 4 (fp32) bytes, plus 4
bytes per news for the stamps below (:func:`cache_bytes`). The operating system keeps what is hot in RAM and
spills the rest to disk, so memory stays bounded however large the corpus.

One copy per node (:class:`FrozenCachePlace`): the ranks of a node map the same files, in node-local scratch
(``engine.frozen_cache_dir``, default the system's temporary folder), so a node holds one copy whatever its number
of ranks, and no rank moves states through a network filesystem.

Sharing between processes without locks. Beside the states, ``stamps`` [num_news] (int32, in its own mapped file)
says who may read a news's rows: 0 = nobody has written them; s > 0 = written by a rank while it had completed
s - 1 synchronizing collectives (``engine.distributed.SYNC_ROUNDS``: collectives whose result the host read, so
every rank had entered them; the trainer's per-micro-batch agreement and barriers). A rank reads another rank's
rows only once it has completed s of them itself: the writer entered its s-th such collective after it wrote
the rows (program order), and this rank's s-th completed only after every rank had entered it, so the rows were
whole before this rank looks. On CUDA the chain runs through the host-side launch of the writer's collective and
the reader's wait for its result, which the driver orders with memory barriers; no ordering of plain stores
between processes is assumed anywhere, so it holds on weakly ordered CPUs too. Rows written this round by another
rank are computed again by whoever needs them now, served from that computation and not stored (counted in
``pending``). A rank writes only rows whose stamp is 0; two ranks that find the same news unwritten in the same
round may both write it: each writes the same frozen function of the same tokens and weights, rounded to the
storage dtype (at worst the two differ in the last bits where their batches' kernels reduce in another order),
and nobody reads those rows before the next round.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speedyrec.engine.distributed import SYNC_ROUNDS, DistInfo, barrier, broadcast_bytes
from speedyrec.engine.host_sync import to_device
from speedyrec.engine.precision import runs_bf16

log = logging.getLogger("speedyrec.frozen")

# how the states are kept on disk: numpy has no bfloat16, so its bits are kept as int16
_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.int16}


def cache_bytes(real_tokens: int, hidden: int, num_news: int, dtype: torch.dtype) -> int:
    """Bytes on disk of one frozen-prefix cache: every real token's state in ``dtype``, and a stamp per news."""
    return real_tokens * hidden * torch.empty((), dtype=dtype).element_size() + 4 * num_news


class FrozenPrefixCache:
    def __init__(self, real_tokens: np.ndarray, hidden: int, path: Path, dtype: torch.dtype = torch.float32,
                 create: bool = True):
        """real_tokens [num_news]: real tokens of each news in its encoder layout (mask.sum()). ``create``: make the
        files (the node's first rank); else map the ones it made (``path`` and ``path.stamps.npy``)."""
        if dtype not in _STORAGE:
            raise ValueError(f"the frozen-prefix cache stores float32 or bfloat16, not {dtype}")
        self.offsets = np.zeros(len(real_tokens) + 1, dtype=np.int64)
        np.cumsum(real_tokens, out=self.offsets[1:])
        self.hidden, self.dtype = hidden, dtype
        path = Path(path)
        self.path, self.stamp_path = path, path.with_name(path.name + ".stamps.npy")
        rows = max(int(self.offsets[-1]), 1)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.states = np.lib.format.open_memmap(path, mode="w+", dtype=_STORAGE[dtype], shape=(rows, hidden))
            self.stamps = np.lib.format.open_memmap(self.stamp_path, mode="w+", dtype=np.int32,
                                                    shape=(len(real_tokens),))
        else:
            self.states = np.load(path, mmap_mode="r+")
            self.stamps = np.load(self.stamp_path, mmap_mode="r+")
            if self.states.shape != (rows, hidden) or self.states.dtype != _STORAGE[dtype] \
                    or self.stamps.shape != (len(real_tokens),):
                raise RuntimeError(f"{path}: the node's frozen-prefix cache was made for other news or settings "
                                   f"({self.states.shape} {self.states.dtype}, expected {(rows, hidden)} "
                                   f"{np.dtype(_STORAGE[dtype])})")
        self.owner = create
        self.mine = np.zeros(len(real_tokens), dtype=bool)  # rows this process wrote (readable at once)
        self.hits = 0
        self.computed = 0
        self.fills = 0  # calls that computed and stored new news (each reads their states back to the host)
        self.pending = 0  # news computed again because another rank wrote them in this very round

    @property
    def stored(self) -> np.ndarray:
        """Which news have states in the cache (written by any rank of the node)."""
        return np.asarray(self.stamps) > 0

    def close(self) -> None:
        del self.states, self.stamps
        if self.owner:  # the others may still map them: the files go when the last map does
            for p in (self.path, self.stamp_path):
                try:
                    os.remove(p)
                except OSError:
                    pass
            for d in (self.path.parent, self.path.parent.parent):  # the attempt's and the run's folders, once empty
                try:
                    d.rmdir()
                except OSError:
                    break

    def _readable(self, news: np.ndarray) -> np.ndarray:
        stamp = np.asarray(self.stamps[news])
        return self.mine[news] | ((stamp > 0) & (stamp <= SYNC_ROUNDS[0]))

    def _to_host(self, states: torch.Tensor) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            return states.view(torch.int16).cpu().numpy()
        return states.cpu().numpy()

    def _from_host(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(rows))
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(device, non_blocking=True).float()

    def start_states(self, news: np.ndarray, mask: torch.Tensor, compute, lengths: np.ndarray | None = None) -> torch.Tensor:
        """Frozen-layer output for news [R] whose padded mask is ``mask`` ([R, T] or [R, S, T]; real tokens first in
        every row or segment).

        ``compute(rows) -> [len(rows), *mask.shape[1:], H]`` runs the frozen layers for the given rows of
        the batch; it is called only for news this rank may not read from the cache yet. ``lengths`` ([R] or
        [R, S]): the real tokens of each row or segment, known on the host (None: read from the mask). Returns
        float32 [R, *mask.shape[1:], H] on mask's device, rounded to the storage dtype whether computed now or read
        back. The real tokens' positions come from the host lengths, so storing and serving are index operations:
        the only read from the device is the new news' states, which this host-memory cache must hold.
        """
        news = np.asarray(news, dtype=np.int64)
        device = mask.device
        if lengths is None:
            lengths = mask.sum(-1).cpu().numpy()
        width = mask.shape[-1]
        out = torch.zeros((*mask.shape, self.hidden), dtype=torch.float32, device=device)
        if len(news) == 0:
            return out
        flat = out.view(-1, self.hidden)
        # flat positions of the real tokens in [R * S * T], row after row in layout order; row r's are
        # real[per_row[r]:per_row[r + 1]]
        seg = np.asarray(lengths, dtype=np.int64).reshape(len(news), -1)
        starts = (np.arange(seg.size, dtype=np.int64) * width).reshape(seg.shape)
        real = _ranges(starts.reshape(-1), (starts + seg).reshape(-1))
        per_row = np.zeros(len(news) + 1, dtype=np.int64)
        np.cumsum(seg.sum(1), out=per_row[1:])
        assert (per_row[1:] - per_row[:-1] == self.offsets[news + 1] - self.offsets[news]).all(), \
            "token layout changed since the cache was sized"
        ready = self._readable(news)
        hit = np.flatnonzero(ready)
        if len(hit):
            src = _ranges(self.offsets[news[hit]], self.offsets[news[hit] + 1])
            flat.index_copy_(0, to_device(real[_ranges(per_row[hit], per_row[hit + 1])], device),
                             self._from_host(self.states[src], device))
        self.hits += len(hit)
        missing = np.flatnonzero(~ready)
        if len(missing):
            distinct, first, which = np.unique(news[missing], return_index=True, return_inverse=True)
            computed = missing[first]  # one computation per distinct news
            fresh = compute(computed).float().reshape(-1, self.hidden)  # [len(computed) * S * T, H]
            # the computed rows' real tokens, in the computed tensor's own (row by row) layout
            sub = seg[computed].reshape(-1)
            sub_starts = np.arange(len(sub), dtype=np.int64) * width
            picked = fresh.index_select(0, to_device(_ranges(sub_starts, sub_starts + sub), device))
            picked = picked.to(self.dtype)
            free = np.asarray(self.stamps[distinct]) == 0  # nobody wrote them yet: this rank writes them
            if free.any():
                at = np.zeros(len(computed) + 1, dtype=np.int64)
                np.cumsum(seg[computed].sum(1), out=at[1:])
                keep = np.flatnonzero(free)
                rows = picked.index_select(0, to_device(_ranges(at[keep], at[keep + 1]), device))
                self.states[_ranges(self.offsets[distinct[keep]], self.offsets[distinct[keep] + 1])] = \
                    self._to_host(rows)
                self.stamps[distinct[keep]] = SYNC_ROUNDS[0] + 1  # after the rows (see the module's docstring)
                self.mine[distinct[keep]] = True
                self.fills += 1
            self.pending += int((~free).sum())
            self.computed += len(computed)
            # every missing row (duplicates of a computed news too) is served from this computation
            at_row = np.zeros(len(computed) + 1, dtype=np.int64)
            np.cumsum(seg[computed].sum(1), out=at_row[1:])
            src = _ranges(at_row[which], at_row[which + 1])
            flat.index_copy_(0, to_device(real[_ranges(per_row[missing], per_row[missing + 1])], device),
                             picked.index_select(0, to_device(src, device)).float())
        return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    from speedyrec.engine.ragged import ragged_positions

    return ragged_positions(starts, ends)


def _node() -> int:
    """This process's node: torchrun's GROUP_RANK (0 without torchrun)."""
    return int(os.environ.get("GROUP_RANK", "0"))


@dataclass
class FrozenCachePlace:
    """Where a run's frozen-prefix caches live on this node, in which dtype, and which rank makes them."""

    directory: Path  # this node's folder for this run and attempt
    dtype: torch.dtype
    maker: bool  # this rank makes the node's files (its first rank); the others map them
    active: bool  # several ranks (a barrier orders making before mapping)

    def open(self, real_tokens: np.ndarray, hidden: int, name: str) -> FrozenPrefixCache:
        """The node's cache ``name``. Every rank of the run calls it, in the same order (a barrier)."""
        path = self.directory / f"{name}.npy"
        cache = None
        if self.maker:
            need = cache_bytes(int(np.sum(real_tokens)), hidden, len(real_tokens), self.dtype)
            self.directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.directory).free
            if need > free:
                raise RuntimeError(
                    f"the frozen-prefix cache {path} needs {need / 2**30:.2f} GiB (real tokens x hidden x "
                    f"{torch.empty((), dtype=self.dtype).element_size()} bytes) and {self.directory} has "
                    f"{free / 2**30:.2f} GiB free: point engine.frozen_cache_dir at a larger node-local disk, or "
                    "set engine.frozen_cache=false to recompute the frozen layers at every step")
            log.info("frozen-prefix cache %s: %.1f MiB (%s)", path, need / 2**20, self.dtype)
            cache = FrozenPrefixCache(real_tokens, hidden, path, self.dtype, create=True)
        if self.active:
            barrier()
        return cache or FrozenPrefixCache(real_tokens, hidden, path, self.dtype, create=False)


def frozen_cache_place(cfg, dist: DistInfo, out_dir: Path) -> FrozenCachePlace:
    """The node-local folder of this run's frozen-prefix caches: ``engine.frozen_cache_dir`` (default: the system's
    temporary folder) / a name from rank 0's ``out_dir`` / this attempt and node; bfloat16 where the run computes
    under bf16 autocast (train.amp), else float32. The node's first rank clears what earlier attempts of the same run
    left there. A collective when several ranks run."""
    dtype = torch.bfloat16 if runs_bf16(dist.device, cfg.train.amp) else torch.float32
    base = Path(cfg.engine.frozen_cache_dir or tempfile.gettempdir()).expanduser()
    mine = str(Path(out_dir).resolve()).encode() if dist.is_main else None
    key = broadcast_bytes(mine, dist.device) if dist.active else str(Path(out_dir).resolve()).encode()
    run = base / f"speedyrec-frozen-{hashlib.sha256(key).hexdigest()[:16]}"
    here = f"attempt{dist.attempt}-node{_node()}"
    maker = dist.local_rank == 0
    if maker and run.is_dir():
        for old in run.glob(f"attempt*-node{_node()}"):
            if old.name != here:
                shutil.rmtree(old, ignore_errors=True)
    return FrozenCachePlace(run / here, dtype, maker, dist.active)
