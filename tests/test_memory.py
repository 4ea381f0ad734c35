"""Peak memory per phase and the heap hand-back (engine/memory.py), against what the kernel reports."""
from __future__ import annotations

import gc

import pytest
import torch

from speedyrec.engine.distributed import DistInfo
from speedyrec.engine.memory import HeapTrimmer, peak_rss_mb, process_peak_rss_mb, reset_peak_rss
from speedyrec.engine.trainer import StepOutput, Trainer

# Linux (6.2+) counts resident pages in per-CPU counters and reads them approximately: VmHWM read 2,000 times in
# a row, nothing allocated, gave 17 values 0.06 MiB apart on this machine's 6.18 kernel. Two reads of it compare
# within this slack (the counters' error is a batch of pages per CPU)
COUNTER_SLACK_MB = 0.5
glibc = pytest.mark.skipif(not HeapTrimmer(1).available, reason="needs glibc's malloc_trim and /proc")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def fragment_heap(mb: int, keep_every: int = 8) -> list:
    """Fill ``mb`` MiB of heap with 64 KiB blocks (below glibc's mmap threshold, so from the heap), written so
    their pages are resident, and free all but every ``keep_every``-th: the heap cannot shrink past the kept
    ones, as when tensors of varying shapes come and go."""
    blocks = [b"x" * (64 * 1024 - 64) for _ in range(mb * 16)]
    kept = blocks[::keep_every]
    del blocks
    gc.collect()
    return kept


@glibc
def test_trim_hands_back_freed_heap_pages_at_its_interval():
    trimmer = HeapTrimmer(3)
    kept = fragment_heap(256)
    before = rss_mb()
    assert trimmer.maybe_trim(1) is None and trimmer.maybe_trim(2) is None
    assert rss_mb() > before - 20  # nothing given back between trims
    took = trimmer.maybe_trim(3)
    after = rss_mb()
    # about 7/8 of the 256 MiB written were freed; the trim must give most of that back to the system
    assert before - after > 150, (before, after)
    assert took is not None and took > 0
    del kept


def test_an_interval_of_zero_turns_trimming_off():
    trimmer = HeapTrimmer(0)
    assert not trimmer.available
    assert trimmer.maybe_trim(0) is None


@pytest.mark.skipif(peak_rss_mb() is None or not reset_peak_rss(), reason="needs Linux's VmHWM and clear_refs")
def test_peak_restarts_at_a_reset_and_the_process_peak_keeps_the_old_one():
    # Sizes well above the counters' error: the kernel's per-CPU batches scale with the host's CPU count, not with
    # the two cores we get, and a CI host with many CPUs read an 80 MiB tensor as 69 MiB of growth
    big = torch.ones(100 * 2**20)  # 400 MiB, written
    high = peak_rss_mb()
    del big
    gc.collect()
    assert reset_peak_rss()
    low = peak_rss_mb()
    assert low < high - 300, (low, high)  # the new peak starts from today's resident size
    assert process_peak_rss_mb() >= high - COUNTER_SLACK_MB
    before = rss_mb()  # another test's leftover thread may free memory after the reset: count from here
    touched = torch.ones(100 * 2**20)  # 400 MiB
    assert peak_rss_mb() >= before + 300, (low, before)
    del touched


@glibc
def test_the_trainer_trims_after_optimizer_steps_and_counts_it():
    model = torch.nn.Linear(4, 1)
    kept: list = []

    def step(batch):
        kept.append(fragment_heap(2))  # each step leaves a fragmented heap behind
        loss = model(torch.ones(2, 4)).sum()
        return StepOutput(loss_sum=loss, targets=2, counters={})

    def run(every):
        kept.clear()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), DistInfo(), log_every=0,
                          heap_trim_every=every)
        trainer.fit(1, lambda epoch, skip: iter(range(12)), step)
        return trainer

    trimmed = run(4)
    assert trimmed.state.counters["heap_trims"] == 3  # after steps 4, 8 and 12
    assert trimmed.state.counters["heap_trim_seconds"] > 0
    assert trimmed.setup_peak_rss_mb is None or trimmed.setup_peak_rss_mb > 0
    assert "heap_trims" not in run(0).state.counters
