"""Which precision a run trains in: bf16 autocast where the hardware computes bf16 natively, else float32.

``train.amp=auto`` is resolved once per run, after the process group exists. Each rank looks at its own device
(CUDA: ``torch.cuda.is_bf16_supported``; a CPU: the ``avx512_bf16`` or ``amx_bf16`` instructions in
/proc/cpuinfo, which oneDNN's bf16 matmuls use; without them bf16 is emulated and slower than float32), and the
ranks agree with a MIN all-reduce: bf16 only if every rank has it, so ranks on different machines never train in
different precisions.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 instruction sets among the CPU's flags (``cpuinfo``: /proc/cpuinfo's text; read when None).
    Empty where the system does not say (no /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def native_bf16(device: torch.device) -> str:
    """Why this device computes bf16 natively (e.g. "CPU with avx512_bf16, amx_bf16"), or "" if it does not."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} with bf16" if torch.cuda.is_bf16_supported() else ""
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return f"CPU with {', '.join(flags)}"
    return ""


def resolve_amp(amp: str, device: torch.device, cpu_auto: bool, dist_active: bool = False) -> tuple[str, str]:
    """(``bf16`` | ``off``, why) for ``train.amp``. ``auto``: bf16 where every rank's device has native bf16 (on a
    CPU only when ``cpu_auto``: where bf16 was measured to keep quality), else off. A collective when
    ``dist_active`` and amp is auto: every rank must call it."""
    if amp != "auto":
        return amp, "train.amp=" + amp
    why = native_bf16(device)
    usable = bool(why) and (device.type != "cpu" or cpu_auto)
    if dist_active:
        t = torch.tensor([1.0 if usable else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        if usable and t.item() < 1.0:
            return "off", f"train.amp=auto: {why}, but another rank's device has no native bf16"
        usable = t.item() >= 1.0
    if usable:
        return "bf16", f"train.amp=auto: {why}"
    if why:
        return "off", f"train.amp=auto: {why}, but this stage keeps float32 on CPUs"
    return "off", f"train.amp=auto: {device.type} without native bf16"


def runs_bf16(device: torch.device, amp: str) -> bool:
    """Whether ``amp`` means bf16 autocast (auto counts as bf16 on CUDA: a resolved run never passes auto)."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast where runs_bf16, else nothing."""
    if runs_bf16(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
