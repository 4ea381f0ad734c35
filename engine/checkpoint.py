"""Checkpoints that continue a run exactly, on any number of ranks.

A checkpoint is a directory ``checkpoints/step_N/``:

- ``model.pt`` (rank 0): model, optimizer, step, epoch, the run's config, the world size and what the recipe
  adds (e.g. the dev curve);
- ``rank{r}.pt`` (every rank): what differs by rank: the RNG states of torch (CPU and CUDA), numpy and
  Python; the loader position (micro-batches done in the epoch), the counters and loop time; the workflow's
  state (the embedding cache, so a resumed run serves the rows an uninterrupted one would);
- ``meta.json``: step, world size and the files with their sizes.

Every file is written to a temporary name, flushed to disk (fsync) and renamed; the directory is assembled as
``.step_N.tmp`` and renamed to ``step_N`` only once every rank has written its part, so a ``step_N`` is
complete by construction, and a crash while saving leaves the earlier checkpoints as they were. Resuming
takes the newest checkpoint that every rank can read; one that cannot be read (truncated, corrupt, written by
another world size) is skipped with a warning that names it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from speedyrec.engine.distributed import DistInfo, barrier

log = logging.getLogger("speedyrec.train")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found, reverse=True)]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write(obj, path: Path) -> None:
    """torch.save to a temporary name, fsync, rename: the file is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = ("the disk is full: free space or lower train.keep_checkpoints" if e.errno == errno.ENOSPC else
                "check that out_dir is writable")
        raise CheckpointError(f"cannot write checkpoint file {path}: {e.strerror or e}; {hint}. Earlier checkpoints "
                              "are untouched.") from e


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(root: Path, dist: DistInfo, step: int, shared: dict, own: dict, keep: int = 0) -> Path:
    """Write checkpoint ``root/step_{step}`` (collective: every rank calls it). ``shared``: what rank 0 writes
    (model, optimizer, config, ...); ``own``: this rank's state. ``keep`` > 0 keeps only the newest ``keep``."""
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if dist.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"cannot create {tmp}: {e.strerror or e}; check that out_dir is writable") from e
    barrier()
    _write({**own, "rank": dist.rank, "world": dist.world}, tmp / f"rank{dist.rank}.pt")
    if dist.is_main:
        _write({**shared, "step": step, "world": dist.world}, tmp / "model.pt")
    barrier()
    if dist.is_main:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta = tmp / "meta.json"
        with open(meta, "w") as f:
            json.dump({"step": step, "world": dist.world, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. the end of a run that checkpointed there)
            shutil.rmtree(final)
        tmp.replace(final)
        _fsync_dir(root)
        if keep > 0:
            for old in step_dirs(root)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _read(directory: Path, dist: DistInfo) -> tuple[dict, dict]:
    meta = json.loads((directory / "meta.json").read_text())
    if meta["world"] != dist.world:
        raise CheckpointError(f"written by {meta['world']} ranks, this run has {dist.world}")
    for name, size in meta["files"].items():
        actual = (directory / name).stat().st_size
        if actual != size:
            raise CheckpointError(f"{name} has {actual} bytes, {size} were written")
    shared = torch.load(directory / "model.pt", map_location=dist.device, weights_only=False)
    own = torch.load(directory / f"rank{dist.rank}.pt", map_location=dist.device, weights_only=False)
    return shared, own


def load_newest(root: Path, dist: DistInfo) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint under ``root`` that every rank reads: (directory, shared, own), or None if there is
    none. Unreadable ones are skipped with a warning naming them (collective)."""
    for directory in step_dirs(root):
        try:
            shared, own = _read(directory, dist)
            ok = 1.0
        except Exception as e:  # noqa: BLE001 - any failure to read means: not this one
            shared = own = None
            ok = 0.0
            log.warning("checkpoint %s cannot be read on rank %d (%s): skipping it", directory, dist.rank,
                        str(e).splitlines()[0][:200])
        flag = torch.tensor([ok], device=dist.device)
        if dist.active:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() == 1.0:
            return directory, shared, own
        if ok and dist.is_main:
            log.warning("checkpoint %s is unreadable on another rank: skipping it", directory)
    return None


def load_path(path: Path, dist: DistInfo) -> tuple[Path, dict, dict]:
    """A checkpoint named by the user (a step_N directory, or its model.pt)."""
    directory = path.parent if path.name == "model.pt" else path
    if not (directory / "meta.json").is_file():
        raise CheckpointError(f"train.resume={path}: no checkpoint there (expected a checkpoints/step_N directory)")
    try:
        shared, own = _read(directory, dist)
    except CheckpointError as e:
        raise CheckpointError(f"train.resume={path}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"train.resume={path}: cannot read it ({str(e).splitlines()[0][:200]}); "
                              "resume from another one, or train.resume=auto for the newest readable") from e
    return directory, shared, own
