"""Model files of the distillation stages: what changed from the base PLM, and the checksum of the whole.

A snapshot holds only the tensors that differ from the pretrained encoder it started from (the trained
top layers, pooling, projection, user encoder), so M teachers cost M x a few layers on disk, plus the
sha256 of the model's complete state. Loading rebuilds the base PLM, applies the delta and recomputes
the checksum: a teacher that does not hold exactly the weights it was saved with (a delta that did not
load, another base encoder, a changed tokenizer vocabulary) is an error, never a silent fresh start.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from speedyrec.config import ConfigError
from speedyrec.engine.safe_io import is_pickle, write_bytes
from speedyrec.models.checksum import weights_checksum

FORMAT = "speedyrec-snapshot/2"  # /1 was a pickle (torch.save), no longer read: python -m speedyrec.checkpoint convert
SUFFIX = ".safetensors"


class SnapshotError(ConfigError):
    """A model file is missing, is not a snapshot, or does not reproduce the weights it was saved with."""


def save_snapshot(path: Path, module: nn.Module, changed: set[str], meta: dict) -> str:
    """Write ``module``'s tensors named in ``changed`` (state-dict names) and its full checksum, as a safetensors
    file (the format, checksum and ``meta`` in its header's metadata, as strings); returns the checksum."""
    state = module.state_dict()
    unknown = sorted(changed - state.keys())
    assert not unknown, f"not in the module: {unknown[:3]}"
    checksum = weights_checksum(state)
    write_snapshot_file(path, {k: state[k] for k in sorted(changed)}, checksum, meta)
    return checksum


def write_snapshot_file(path: Path, delta: dict, checksum: str, meta: dict) -> None:
    """The snapshot file itself: ``delta``'s tensors, and the format, checksum and ``meta`` in the header."""
    delta = {k: t.detach().cpu().contiguous().clone() for k, t in delta.items()}
    header = {"format": FORMAT, "checksum": checksum, "meta": json.dumps(meta)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, st_save(delta, metadata=header))


def read_snapshot(path: Path) -> dict:
    """{"format", "delta" (name -> tensor), "checksum", "meta"} of the snapshot at ``path``; reads only the
    safetensors format, which holds data and nothing that runs."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"no model file at {path}")
    if is_pickle(path):
        raise SnapshotError(f"{path} was written by an older speedyrec as a pickle, which this version does not open "
                            "(opening a pickle can run any code it carries). If you trust its origin, convert it: "
                            f"python -m speedyrec.checkpoint convert {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            delta = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except (SafetensorError, OSError, ValueError) as e:
        raise SnapshotError(f"{path} is not a speedyrec snapshot ({str(e).splitlines()[0][:200]})") from e
    if header.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a speedyrec snapshot (expected format {FORMAT}, found "
                            f"{header.get('format')!r})")
    return {"format": FORMAT, "delta": delta, "checksum": header["checksum"], "meta": json.loads(header["meta"])}


def apply_delta(module: nn.Module, snap: dict, path: Path) -> None:
    """Copy the snapshot's tensors into ``module`` (built from the base PLM), by name and shape."""
    state = module.state_dict()
    for name, t in snap["delta"].items():
        if name not in state:
            raise SnapshotError(f"{path}: tensor {name} has no place in the model built from "
                                f"{snap['meta'].get('encoder', 'the configured encoder')}")
        if tuple(state[name].shape) != tuple(t.shape):
            raise SnapshotError(f"{path}: tensor {name} is {tuple(t.shape)} in the file but {tuple(state[name].shape)} "
                                "in the model (another encoder, model.dim or vocabulary?)")
    module.load_state_dict(snap["delta"], strict=False)


def verify_checksum(module: nn.Module, snap: dict, path: Path, what: str) -> str:
    """Raise unless ``module`` holds exactly the weights the snapshot was saved with; returns the checksum."""
    got = weights_checksum(module)
    if got != snap["checksum"]:
        raise SnapshotError(
            f"{what} does not hold the weights of {path}: checksum {got[:12]} after loading, {snap['checksum'][:12]} "
            f"when saved. The model would silently start from other weights. Was it built from another encoder "
            f"(saved with model.encoder={snap['meta'].get('encoder', '?')}), model.dim or tokenizer?")
    return got


def load_snapshot(module: nn.Module, path: Path, what: str, snap: dict | None = None) -> dict:
    """Apply the snapshot at ``path`` (``snap``: it, read already) to ``module`` and verify the checksum; returns
    the snapshot."""
    snap = read_snapshot(path) if snap is None else snap
    apply_delta(module, snap, path)
    verify_checksum(module, snap, path, what)
    return snap
