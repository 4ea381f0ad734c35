"""Convert checkpoints and snapshots an earlier speedyrec pickled into the format that loads without running code.

    python -m speedyrec.checkpoint convert PATH [PATH ...]

PATH: a checkpoint directory (``checkpoints/step_N`` holding ``model.pt``), a snapshot file (``student.pt``,
``teacher_1.pt``, ...), or a folder (a run's out_dir): every checkpoint and snapshot under it. Each is rewritten
as safetensors + JSON beside it and the pickle is removed. Run it on files you trust: speedyrec itself opens no
pickle. Even here the pickle is read with torch's weights-only unpickler, which allows tensors, containers and
numpy arrays and scalars (the RNG states), and refuses anything else; a file that needs more is left as it is
and named.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from speedyrec.distill import snapshots
from speedyrec.engine import checkpoint
from speedyrec.engine.safe_io import save_tree


def _numpy_globals() -> list:
    """What a pickled numpy array, dtype or scalar refers to, under numpy 2's names and numpy 1's."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    names = [(core._reconstruct, "_reconstruct"), (core.scalar, "scalar")]
    out: list = [np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):  # an array's dtype is rebuilt through its class (numpy.dtypes.UInt32DType, ...)
        out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    for obj, name in names:
        out += [(obj, f"numpy._core.multiarray.{name}"), (obj, f"numpy.core.multiarray.{name}")]
    return out


def load_pickle(path: Path):
    """A file torch.save wrote, through the weights-only unpickler with numpy's data types allowed."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses in several ways; each is reported as one
        raise ValueError(f"{path} does not load as data only ({str(e).splitlines()[0][:300]}); not converted") from e


def convert_checkpoint(directory: Path) -> list[Path]:
    """``directory/model.pt`` and ``rank{r}.pt`` -> ``.safetensors`` + ``.json``, and meta.json in the new format."""
    parts = [directory / "model.pt", *sorted(directory.glob("rank*.pt"))]
    loaded = {p.stem: load_pickle(p) for p in parts if p.exists()}  # every part readable before anything changes
    for stem, obj in loaded.items():
        save_tree(obj, directory / stem)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = loaded.get("model", {})
    checkpoint.write_meta(directory, meta.get("step", model.get("step")), meta.get("world", model.get("world")))
    for p in parts:
        p.unlink(missing_ok=True)
    return [directory / f"{stem}.safetensors" for stem in loaded]


def convert_snapshot(path: Path) -> Path:
    """A pickled snapshot (format speedyrec-snapshot/1) -> the same name with .safetensors."""
    snap = load_pickle(path)
    if not isinstance(snap, dict) or snap.get("format") != "speedyrec-snapshot/1":
        raise ValueError(f"{path} is not a speedyrec snapshot of the pickled format; not converted")
    out = path.with_suffix(snapshots.SUFFIX)
    snapshots.write_snapshot_file(out, snap["delta"], snap["checksum"], snap["meta"])
    path.unlink()
    return out


def convert(path: Path) -> tuple[list[Path], list[str]]:
    """Everything convertible at or under ``path`` -> (files written, problems)."""
    written, problems = [], []
    if path.is_file() or (path / "model.pt").exists():
        targets = [path]
    else:
        found = sorted(path.rglob("*.pt"))
        ckpt_dirs = sorted({p.parent for p in found if p.name == "model.pt"})
        targets = ckpt_dirs + [p for p in found if p.parent not in ckpt_dirs]
    for t in targets:
        try:
            written += convert_checkpoint(t) if t.is_dir() else [convert_snapshot(t)]
        except (ValueError, OSError) as e:
            problems.append(str(e))
    return written, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedyrec.checkpoint", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite pickled checkpoints and snapshots as safetensors + JSON")
    c.add_argument("paths", nargs="+")
    a = ap.parse_args(argv)
    written, problems = [], []
    for p in map(Path, a.paths):
        if not p.exists():
            problems.append(f"{p}: no such file or directory")
            continue
        w, pr = convert(p)
        written += w
        problems += pr
    for w in written:
        print(f"converted: {w}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not written and not problems:
        print("nothing to convert (no .pt files)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
