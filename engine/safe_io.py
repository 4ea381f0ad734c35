"""Files that loading cannot turn into code: tensors in safetensors, everything else in JSON.

A checkpoint, snapshot or export is a file people pass around; a pickle runs whatever its author put in it
when it is opened. Here an object tree (dicts, lists, tuples, numbers, strings, tensors, numpy arrays and
scalars: what model, optimizer, RNG and loader states are made of) is split into

- ``NAME.safetensors``: every tensor and numpy array, by a generated key;
- ``NAME.json``: the tree with each tensor replaced by ``{"__tensor__": key}`` (tuples, numpy arrays and
  scalars, dicts whose keys are not plain strings, ordered dicts with their ``_metadata`` (a state dict's
  module versions) and torch dtypes carry a marker of their own, so the tree comes back with the same types).

Anything else (a class instance, a function) is refused when saving, with the place in the tree that holds
it: nothing is dropped silently, and nothing but data is ever read back. Reading parses JSON and safetensors
only. Every file is written under a temporary name, flushed (fsync) and renamed, so it is whole or absent;
``write_bytes`` goes through ``OPEN`` so that tests can simulate a disk that fails half way.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

OPEN = open  # how files are opened for writing (a test replaces it with a disk that fails)
CHUNK = 1 << 20


def pack(obj, tensors: dict[str, torch.Tensor], where: str = "") -> object:
    """``obj`` as a JSON-able tree; its tensors and arrays go into ``tensors`` (CPU, contiguous, none sharing
    memory with another: safetensors stores each on its own)."""
    return _Packer(tensors).pack(obj, where)


class _Packer:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.storages = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}

    def pack(self, obj, where: str):
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self.put(obj.detach())}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError(f"cannot store a numpy array of Python objects at {where or 'the top'}")
            return {"__ndarray__": self.put(torch.from_numpy(np.ascontiguousarray(obj)))}
        if isinstance(obj, np.generic):
            return {"__npscalar__": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, OrderedDict):  # a state dict: its _metadata (module versions) matters to loading it
            tree = {"__ordered__": self.pack(dict(obj), where)}
            if getattr(obj, "_metadata", None) is not None:
                tree["metadata"] = self.pack(obj._metadata, f"{where}._metadata")
            return tree
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.pack(v, f"{where}.{k}" if where else k) for k, v in obj.items()}
            return {"__items__": [[self.pack(k, f"{where}<key>"), self.pack(v, f"{where}[{k!r}]")]
                                  for k, v in obj.items()]}
        raise TypeError(f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} at {where or 'the top'} in "
                        "a file that loads without running code (tensors, arrays, numbers, strings, lists, tuples, "
                        "dicts)")

    def put(self, t: torch.Tensor) -> str:
        t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.storages:  # a view of a tensor stored already (tied weights, a slice): its own copy
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            self.storages.add(ptr)
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t
        return key


def unpack(tree, tensors: dict[str, torch.Tensor]):
    """The object ``pack`` was given, from its tree and tensors."""
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].cpu().numpy()
    if "__npscalar__" in tree:
        return np.dtype(tree["__npscalar__"]).type(tree["value"])
    if "__dtype__" in tree:
        return getattr(torch, tree["__dtype__"])
    if "__tuple__" in tree:
        return tuple(unpack(v, tensors) for v in tree["__tuple__"])
    if "__ordered__" in tree:
        out = OrderedDict(unpack(tree["__ordered__"], tensors))
        if "metadata" in tree:
            out._metadata = unpack(tree["metadata"], tensors)
        return out
    if "__items__" in tree:
        return {unpack(k, tensors): unpack(v, tensors) for k, v in tree["__items__"]}
    return {k: unpack(v, tensors) for k, v in tree.items()}


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """``data`` to ``path`` through a temporary name, fsync and rename: whole or absent. On an error the
    temporary file is removed and the error raised (the caller names what it was writing)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    view = memoryview(data)
    try:
        with OPEN(tmp, "wb") as f:
            for lo in range(0, len(view), CHUNK):
                f.write(view[lo:lo + CHUNK])
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tree(obj, stem: Path, metadata: dict[str, str] | None = None) -> list[Path]:
    """``obj`` as ``stem.safetensors`` and ``stem.json``; returns the two paths."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    tree = pack(obj, tensors)
    st_path, js_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    write_bytes(st_path, st_save(tensors, metadata=metadata))
    write_bytes(js_path, json.dumps(tree).encode())
    return [st_path, js_path]


def load_tree(stem: Path, device: torch.device | str = "cpu"):
    """What ``save_tree`` wrote at ``stem``, its tensors on ``device``."""
    stem = Path(stem)
    tensors = read_tensors(stem.with_name(stem.name + ".safetensors"), device)
    tree = json.loads(stem.with_name(stem.name + ".json").read_text())
    return unpack(tree, tensors)


def read_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    tensors = st_load(Path(path).read_bytes())
    device = torch.device(device)
    return tensors if device.type == "cpu" else {k: v.to(device) for k, v in tensors.items()}


def is_pickle(path: Path) -> bool:
    """A file torch.save wrote (a zip archive, or a legacy pickle): what this package no longer loads. A
    safetensors file (8 bytes of header length, then its JSON header) is not one, whatever its first byte."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
