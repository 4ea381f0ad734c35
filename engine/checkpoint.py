"""Checkpoints that continue a run exactly, on any number of ranks, and that load without running code.

A checkpoint is a directory ``checkpoints/step_N/``:

- ``model.safetensors`` + ``model.json`` (rank 0): model, optimizer, step, epoch, the run's config, the world
  size and what the recipe adds (e.g. the dev curve);
- ``rank{r}.safetensors`` + ``rank{r}.json`` (every rank): what differs by rank: the RNG states of torch (CPU and
  CUDA), numpy and Python; the loader position (micro-batches done in the epoch), the counters and loop time; the
  workflow's state (the embedding cache, so a resumed run serves the rows an uninterrupted one would);
- ``meta.json``: the format, step, world size and the files with their sizes.

Tensors and arrays are in safetensors, the rest in JSON (``engine.safe_io``): opening a checkpoint someone sent
parses data and runs nothing. Checkpoints of earlier versions (``model.pt``, pickles) are refused with the
command that converts them (``python -m speedyrec.checkpoint convert``), which the user runs on files they trust.

Every file is written to a temporary name, flushed to disk (fsync) and renamed; the directory is assembled as
``.step_N.tmp`` and renamed to ``step_N`` only once every rank has written its part, so a ``step_N`` is
complete by construction, and a failed write (a full disk) leaves the earlier checkpoints as they were. Whether
a save failed is agreed by a collective, so every rank raises the same CheckpointError (or, with
``train.checkpoint_errors=warn``, every rank goes on) and none waits at a barrier for a rank that gave up.
Resuming takes the newest checkpoint that every rank can read; one that cannot be read (truncated, corrupt,
written by another world size) is skipped with a warning that names it.
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

from speedyrec.engine.distributed import DistInfo, barrier, broadcast_bytes
from speedyrec.engine.safe_io import load_tree, save_tree, write_bytes

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
    # the states are CPU byte tensors whatever device the checkpoint was loaded to
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


FORMAT = "speedyrec-checkpoint/2"  # /1 (model.pt, rank{r}.pt) was pickled; see speedyrec.checkpoint convert


def _write(obj, stem: Path) -> None:
    """``stem.safetensors`` and ``stem.json``, each whole or absent (engine.safe_io)."""
    try:
        save_tree(obj, stem)
    except OSError as e:
        hint = ("the disk is full: free space or lower train.keep_checkpoints" if e.errno == errno.ENOSPC else
                "check that out_dir is writable")
        raise CheckpointError(f"cannot write checkpoint file {stem}.safetensors/.json: {e.strerror or e}; {hint}. "
                              "Earlier checkpoints are untouched.") from e


def _agree(error: Exception | None, dist: DistInfo, tmp: Path) -> None:
    """Collective: raise on every rank when the save failed on any (this rank's error, or one that names the
    rank that failed), after rank 0 removed the partial directory; a barrier otherwise."""
    flag = torch.tensor([dist.rank + 1.0 if error is not None else 0.0], device=dist.device)
    if dist.active:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() == 0:
        return
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise error  # a CheckpointError, or a TypeError for state that cannot be stored (a bug, never a warning)
    raise CheckpointError(f"rank {int(flag.item()) - 1} could not write its part of checkpoint {tmp.name}; earlier "
                          "checkpoints are untouched")


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
    (model, optimizer, config, ...); ``own``: this rank's state. ``keep`` > 0 keeps only the newest ``keep``.
    Raises CheckpointError on every rank when any rank's part could not be written."""
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    error = None
    if dist.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = CheckpointError(f"cannot create {tmp}: {e.strerror or e}; check that out_dir is writable")
    _agree(error, dist, tmp)
    try:
        _write({**own, "rank": dist.rank, "world": dist.world}, tmp / f"rank{dist.rank}")
        if dist.is_main:
            _write({**shared, "step": step, "world": dist.world}, tmp / "model")
    except (CheckpointError, TypeError) as e:
        error = e
    _agree(error, dist, tmp)
    if dist.is_main:
        try:
            write_meta(tmp, step, dist.world)
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. the end of a run that checkpointed there)
                shutil.rmtree(final)
            tmp.replace(final)
            _fsync_dir(root)
        except OSError as e:
            error = CheckpointError(f"cannot complete checkpoint {final}: {e.strerror or e}. Earlier checkpoints are "
                                    "untouched.")
    _agree(error, dist, tmp)
    if dist.is_main and keep > 0:
        for old in step_dirs(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_meta(directory: Path, step: int, world: int) -> None:
    """``directory/meta.json``: the format, step, world size and the parts' files with their sizes (what reading
    checks a checkpoint against)."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.suffix in (".safetensors", ".json") and p.name != "meta.json"}
    write_bytes(directory / "meta.json", json.dumps({"format": FORMAT, "step": step, "world": world,
                                                     "files": files}).encode())


def is_old_format(directory: Path) -> bool:
    """A checkpoint an earlier version pickled (model.pt, rank{r}.pt)."""
    return (directory / "model.pt").exists() or any(directory.glob("rank*.pt"))


def old_format_error(directory: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory} was written by an earlier speedyrec as pickles (model.pt), which "
                           "this version does not open: opening a pickle can run any code it carries. If you trust "
                           f"its origin, convert it once: python -m speedyrec.checkpoint convert {directory}")


def read_part(directory: Path, name: str, device: torch.device | str = "cpu") -> dict:
    """One part of a checkpoint (``model`` or ``rank{r}``), tensors on ``device``; nothing in it runs."""
    if is_old_format(directory):
        raise old_format_error(directory)
    return load_tree(directory / name, device)


def _read(directory: Path, dist: DistInfo) -> tuple[dict, dict]:
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"format {meta.get('format')!r}, this version reads {FORMAT}")
    if meta["world"] != dist.world:
        raise CheckpointError(f"written by {meta['world']} ranks, this run has {dist.world}")
    for name, size in meta["files"].items():
        actual = (directory / name).stat().st_size
        if actual != size:
            raise CheckpointError(f"{name} has {actual} bytes, {size} were written")
    return read_part(directory, "model", dist.device), read_part(directory, f"rank{dist.rank}", dist.device)


def load_newest(root: Path, dist: DistInfo) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint under ``root`` that every rank reads: (directory, shared, own), or None if there is
    none. Unreadable ones are skipped with a warning naming them (collective). Rank 0 lists the checkpoints and
    every rank tries the same ones, in the same order: ranks that listed their own could run different numbers
    of collectives and hang."""
    names = [d.name for d in step_dirs(root)] if dist.is_main else None
    if dist.active:
        names = json.loads(broadcast_bytes(json.dumps(names).encode() if dist.is_main else None, dist.device))
    for directory in (Path(root) / name for name in names):
        shared = own = None
        if is_old_format(directory):  # not skipped: the run would start over and lose what it holds
            ok = -1.0
        else:
            try:
                shared, own = _read(directory, dist)
                ok = 1.0
            except Exception as e:  # noqa: BLE001 - any failure to read means: not this one
                ok = 0.0
                log.warning("checkpoint %s cannot be read on rank %d (%s): skipping it", directory, dist.rank,
                            str(e).splitlines()[0][:200])
        flag = torch.tensor([ok], device=dist.device)
        if dist.active:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() == -1.0:
            raise old_format_error(directory)
        if flag.item() == 1.0:
            return directory, shared, own
        if ok and dist.is_main:
            log.warning("checkpoint %s is unreadable on another rank: skipping it", directory)
    return None


def load_path(path: Path, dist: DistInfo) -> tuple[Path, dict, dict]:
    """A checkpoint named by the user (a step_N directory, or its model.pt)."""
    directory = path.parent if path.name in ("model.pt", "model.json", "model.safetensors") else path
    if is_old_format(directory):
        raise old_format_error(directory)
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
