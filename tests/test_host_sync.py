"""The training step does not make the host wait for the device (engine/host_sync.py lists the calls that would).

On a CPU nothing waits, so the synchronising calls are counted by patching them; the step's count is the
difference between a run of 2N and one of N optimizer steps, so what setup and the end of training read once
cancels out. A new ``.item()``, boolean mask or ``nonzero`` in the hot loop makes these tests fail. On CUDA the
same loop runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import os
import socket
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_overrides
from speedyrec.config import load_config
from speedyrec.engine.host_sync import count_host_syncs

STEPS = 4


def _fit_counting(overrides: list[str], steps: int) -> tuple[Counter, dict]:
    """Build a finetune run in this process, train ``steps`` optimizer steps while counting host syncs; returns the
    counts and the run's frozen-prefix fills (the calls that stored new news' frozen states)."""
    from speedyrec.build import build_context
    from speedyrec.engine.distributed import init_distributed
    from speedyrec.recipes.finetune import FinetuneRecipe

    cfg = load_config(None, [*overrides, f"train.max_steps={steps}"])
    dist = init_distributed()
    recipe = FinetuneRecipe(build_context(cfg, dist))
    recipe.setup()
    frozen = recipe.inputs.frozen
    fills0 = 0 if frozen is None else frozen.fills
    with count_host_syncs() as counts:
        recipe.trainer.fit(1, recipe.workflow.batches, recipe.workflow.step)
    fills = 0 if frozen is None else frozen.fills - fills0
    recipe.cleanup()
    return counts, {"fills": fills, "micro_batches": recipe.trainer.state.batches_done,
                    "hits": recipe.trainer.state.counters.get("cache_hits", 0)}


def _per_step(overrides: list[str], out) -> tuple[Counter, dict, dict]:
    """The synchronising calls of STEPS optimizer steps: a run of 2 * STEPS minus a run of STEPS."""
    short, s_info = _fit_counting([*overrides, f"out_dir={out}_short"], STEPS)
    long, l_info = _fit_counting([*overrides, f"out_dir={out}_long"], 2 * STEPS)
    diff = Counter({k: long[k] - short[k] for k in set(long) | set(short) if long[k] != short[k]})
    return diff, s_info, l_info


def _args(cache_dir, synthetic_small, *extra) -> list[str]:
    # a cache that serves from the first steps, so served rows (and their ages) are on the path
    return tiny_overrides("unused", cache_dir, "data.format=synthetic", f"data.dir={synthetic_small}",
                          "engine.token_budget=3000", "engine.cache_beta=0.5", "eval.max_impressions=40", *extra)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_default_training_step_never_waits_for_the_device(tmp_path, cache_dir, synthetic_small, amp):
    """One process, the default step (dynamic batches, centralized encoding, cache, autoregressive loss, AdamW):
    no synchronising call at all; the targets, widths and token counts are known on the host, served ages and
    other device counters are read when a log line needs them."""
    diff, short, long = _per_step(_args(cache_dir, synthetic_small, f"train.amp={amp}"), tmp_path / "run")
    assert long["hits"] > 0, "the cache served nothing: its path was not exercised"
    assert diff == Counter(), f"synchronising calls per {STEPS} steps: {dict(diff)}"


def test_the_frozen_prefix_reads_back_only_the_states_it_stores(tmp_path, cache_dir, synthetic_small):
    """With frozen layers, the frozen-prefix cache (host memory by design) copies the frozen states of news it has
    not stored yet back to the host: one read per call that stores new news, and nothing else."""
    diff, short, long = _per_step(_args(cache_dir, synthetic_small, "model.freeze_layers=1"), tmp_path / "run")
    fills = long["fills"] - short["fills"]
    assert fills > 0
    assert diff == Counter({"Tensor.cpu": fills, "Tensor.numpy": fills}), dict(diff)


def test_in_batch_negatives_add_no_synchronising_call(tmp_path, cache_dir, synthetic_small):
    diff, _, _ = _per_step(_args(cache_dir, synthetic_small, "engine.inbatch_negatives=true"), tmp_path / "run")
    assert diff == Counter(), dict(diff)


def _two_rank_worker(rank: int, port: int, overrides: list[str], out, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from speedyrec.engine.distributed import shutdown

    try:
        diff, short, long = _per_step(overrides, out)
        queue.put((rank, dict(diff), long["micro_batches"] - short["micro_batches"]))
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_wait_once_per_micro_batch_and_for_the_replicated_cache(tmp_path, cache_dir, synthetic_small):
    """Two gloo ranks: per micro-batch one read of the all-reduce that says whether any rank still has a batch and
    how many targets the ranks hold (control flow and the learning-rate schedule need both); per optimizer step
    the replicated cache's write, which must learn on the host which news the other rank wrote (its stamps live on
    the host): the counts of rows (one read per rank) and their ids (one copy per rank)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    args = _args(cache_dir, synthetic_small)
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, args, tmp_path / "run", queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, diff, micro in results:
        steps = STEPS  # one micro-batch per optimizer step (grad_accum 1)
        assert micro == steps, (rank, micro)
        assert diff == {"Tensor.tolist": micro, "Tensor.item": 2 * steps, "Tensor.cpu": steps,
                        "Tensor.numpy": steps}, (rank, diff)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_on_cuda_the_default_step_runs_under_sync_debug_error(tmp_path, cache_dir, synthetic_small):
    """The same step as above on a GPU, with every synchronising CUDA call an error (after a first step, which
    builds the cache and the optimizer's state)."""
    from speedyrec.build import build_context
    from speedyrec.engine.distributed import init_distributed
    from speedyrec.recipes.finetune import FinetuneRecipe

    cfg = load_config(None, [*_args(cache_dir, synthetic_small), f"out_dir={tmp_path / 'run'}",
                             f"train.max_steps={2 * STEPS}"])
    recipe = FinetuneRecipe(build_context(cfg, init_distributed()))
    recipe.setup()
    trainer = recipe.trainer
    trainer.max_steps = 1
    trainer.fit(1, recipe.workflow.batches, recipe.workflow.step)
    trainer.max_steps = 2 * STEPS
    read = trainer.read_counters

    def deliberate_read():  # the one read at the end of training, outside the step
        torch.cuda.set_sync_debug_mode("default")
        try:
            return read()
        finally:
            torch.cuda.set_sync_debug_mode("error")

    trainer.read_counters = deliberate_read
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.fit(1, recipe.workflow.batches, recipe.workflow.step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.state.step == 2 * STEPS
