"""Host-device synchronisations: the calls that make the host wait for the device, and a counter for them.

On a GPU the host queues kernels ahead of the device; each of the calls below makes it wait until the device has
caught up (it needs a value, or a shape that depends on values), so the queue drains and the GPU idles while
Python prepares the next kernels:

- reading a value: ``Tensor.item``, ``tolist``, ``numpy``, ``cpu``, ``bool(t)``, ``int(t)``, ``float(t)``,
  ``t.__index__`` (a tensor used as a Python index);
- shapes that depend on values: ``nonzero`` (``torch.nonzero``, ``Tensor.nonzero``, one-argument ``torch.where``),
  indexing or assigning with a boolean mask (``x[mask]``, ``x[mask] = v``), ``masked_select``, ``torch.unique``,
  ``repeat_interleave`` without ``output_size``.

The training step avoids them: what the host must know (target positions, token lengths, widths) is computed on the
host with the batch, and counters that live on the device are read only when logged. On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call into an error. A CPU has no queue to
drain, so :func:`count_host_syncs` counts the calls instead, from the calling thread only (the loader thread
prepares batches on the host and may use them freely): a test of the step on a CPU fails when a new one appears.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter

import torch

# (owner, attribute) of every patched entry point
_TENSOR_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                   "masked_select", "unique", "repeat_interleave")
_TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique", "repeat_interleave", "where")


def _is_mask(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, tuple):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _counts(name: str, args, kwargs) -> bool:
    """Whether this call of ``name`` synchronises (the value-dependent forms only)."""
    if name == "where":
        return len(args) + len(kwargs) == 1  # torch.where(cond) is nonzero; the three-argument form is not
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("__getitem__", "__setitem__"):
        return _is_mask(args[1])
    return True


@contextlib.contextmanager
def count_host_syncs():
    """Count, by name, the synchronising calls the current thread makes inside the block -> Counter.

    The patches wrap torch's Python entry points; calls made from C++ (inside autograd, fused optimizers,
    collectives) are not seen, and need not be: they do not wait for values on the host's behalf."""
    counts: Counter = Counter()
    owner = threading.get_ident()
    saved = []

    def wrap(holder, name: str, label: str):
        original = getattr(holder, name)

        def patched(*args, **kwargs):
            if threading.get_ident() == owner and _counts(name, args, kwargs):
                counts[label] += 1
            return original(*args, **kwargs)

        saved.append((holder, name, original))
        setattr(holder, name, patched)

    for name in _TENSOR_METHODS:
        wrap(torch.Tensor, name, f"Tensor.{name}")
    for name in ("__getitem__", "__setitem__"):
        wrap(torch.Tensor, name, f"Tensor.{name}[bool mask]")
    for name in _TORCH_FUNCTIONS:
        wrap(torch, name, f"torch.{name}")
    try:
        yield counts
    finally:
        for holder, name, original in reversed(saved):
            setattr(holder, name, original)


_HOST_INT = torch.Tensor.__int__  # the unpatched read, for host_random_int


def host_random_int(high: int = 2**62) -> int:
    """A random integer in [0, high) from torch's CPU generator (seeded by ``torch.manual_seed``, saved in
    checkpoints). The draw is a tensor on the host in every run, whatever the training device, so reading it never
    waits for a device: it is read with the unpatched ``int``, and count_host_syncs does not count it."""
    return _HOST_INT(torch.randint(0, high, (1,), device="cpu"))


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host array (e.g. indices worked out with the batch) on ``device``, sent without a synchronising copy:
    from pageable memory CUDA stages the bytes before returning, so the array may be reused at once."""
    return torch.as_tensor(array).to(device, non_blocking=True)
