"""The training loop: micro-batches -> forward under autocast -> backward (DDP reduces) -> clip -> step -> log.

The loop knows nothing of news: a step function turns one batch into the summed loss of its training
targets. Gradients are summed over ranks and divided by the global number of targets of the optimizer
step, so every target weighs the same whatever rank and micro-batch it landed in, and ranks may hold
different numbers of targets (dynamic batching) or none at all for a while (uneven shards). On several ranks
the step runs inside DistributedDataParallel, whose all-reduce overlaps the backward.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from speedyrec.engine.cache import OptimizerClock
from speedyrec.engine.checkpoint import rng_state, set_rng_state
from speedyrec.engine.distributed import COMM_BYTES, SYNC_ROUNDS, DistInfo, all_reduce_sum, reduce_gradients
from speedyrec.engine.memory import HeapTrimmer, peak_rss_mb, reset_peak_rss
from speedyrec.engine.precision import autocast_context
from speedyrec.engine.runlog import RunLog, progress

log = logging.getLogger("speedyrec.train")


@dataclass
class StepOutput:
    loss_sum: torch.Tensor | None  # summed loss of this rank's targets (None: nothing to learn from)
    targets: int  # training targets behind loss_sum
    counters: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in the current epoch
    counters: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    targets_seen: float = 0.0  # training targets of all ranks so far (the progress bar's position)


def adamw(param_groups, **kw) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the parameters' device has one (CPU and CUDA do): one pass over all
    parameters instead of a loop of small ops per tensor (measured here on the 2-layer MiniLM student, one
    thread: 22 ms a step against 141 ms for the per-tensor loop)."""
    try:
        return torch.optim.AdamW(param_groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(param_groups, **kw)


class _StepModule(torch.nn.Module):
    """The step function as the forward of a module that owns the model's parameters, so that DDP can wrap a
    whole engine step (centralized encoding, cache, loss), whatever submodules it calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.fn: Callable | None = None

    def forward(self, batch):
        out = self.fn(batch)
        if batch is None:
            # a rank without a batch still takes part in DDP's reduction, which its backward starts only when a
            # parameter's gradient arrives: add a zero loss over the parameters (inside the forward, so that DDP
            # sees which parameters it reaches); the step's own loss (e.g. a global-dedup gather) stays in
            zero = sum(p.reshape(-1)[0] * 0.0 for p in self.model.parameters() if p.requires_grad)
            out = StepOutput(zero if out.loss_sum is None else out.loss_sum + zero, out.targets, out.counters)
        return out


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: DistInfo, *,
                 grad_accum: int = 1, grad_clip: float = 0.0, amp: str = "auto", max_steps: int = 0,
                 max_seconds: float = 0.0,
                 warmup_steps: int = 0, log_every: int = 20, checkpoint_every: int = 0,
                 checkpoint_fn: Callable[["Trainer"], None] | None = None,
                 after_step: Callable[[int], None] | None = None,
                 periodic: Callable[[int], float] | None = None, periodic_every: int = 0,
                 periodic_seconds: float = 0.0,
                 clip_groups: list[list[torch.nn.Parameter]] | None = None,
                 grad_hook: Callable[[], None] | None = None, log_dir: Path | None = None,
                 progress_total: float = 0.0, progress_unit: str = "target", lr_schedule: str = "constant",
                 heap_trim_every: int = 0, overlap_gradient_reduce: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.dist = dist
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.amp = amp
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self._loop_start: float | None = None
        self._excluded = 0.0
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.checkpoint_fn = checkpoint_fn
        self.after_step = after_step  # e.g. refresh the embedding cache with this step's stamps
        self.periodic = periodic  # e.g. evaluation; returns the seconds it took (excluded from wall time)
        self.periodic_every = periodic_every
        self.periodic_seconds = periodic_seconds  # ... or every this many seconds of training (rank 0's clock)
        self._next_periodic = periodic_seconds
        self._stop = False
        self.state = TrainState()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._grad_bytes = sum(p.numel() * p.element_size() for p in self.params)
        # gradients stay allocated across steps, zeroed in place: a gradient that arrives sparse (an embedding table
        # read through a step vocabulary) is then added into resident memory, and a parameter a step does not reach
        # steps with a zero gradient on every rank, as reduce_gradients gives it
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # the optimizer's own step count: evidence (the cache's served ages) reads it instead of state.step
        self.optimizer_clock = OptimizerClock(optimizer)
        # several ranks: the step runs inside DistributedDataParallel, whose bucketed all-reduce overlaps the
        # backward; parameters a step does not use (cache hits, frozen paths) are found by DDP itself.
        # overlap_gradient_reduce=False (a step whose backward runs a collective of its own: global dedup's gather):
        # no DDP; the gradients are reduced after the backward, in one fixed order. DDP launches its bucket
        # all-reduces from autograd hooks, in an order that follows each rank's own graph (ranks hold different
        # batches, one may hold none), so a collective inside the backward could meet them in a different order on
        # different ranks, which NCCL does not allow (a hang). With the reduce after the backward, every rank issues
        # the same sequence: the step's forward collectives, the backward's gather (exactly one per step on every
        # rank, an empty batch included), then the gradient all-reduce, all on the default process group.
        self.ddp = None
        if dist.active and self.params and overlap_gradient_reduce:
            from torch.nn.parallel import DistributedDataParallel

            self._step_module = _StepModule(model)
            # buffers (position ids) are equal on every rank and never change: no sync at each forward
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                              inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
            self.ddp = DistributedDataParallel(
                self._step_module, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                find_unused_parameters=True, **no_buffer_sync)
        # models trained side by side (teachers) are clipped each on its own, as if trained alone
        self.clip_groups = clip_groups or [self.params]
        self.grad_hook = grad_hook  # runs on the reduced gradients before clipping (NewsBERT's momentum)
        base = [g["lr"] for g in optimizer.param_groups]
        self._base_lr = base
        self._warmup = warmup_steps
        if lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be constant or linear, got {lr_schedule!r}")
        if lr_schedule == "linear" and not (max_steps or progress_total):
            raise ValueError("a linear learning-rate decay needs the run's length: max_steps or progress_total")
        self.lr_schedule = lr_schedule
        self.progress_total, self.progress_unit = progress_total, progress_unit
        self._set_lr()
        # rank 0 tells what happens: scalars in log_dir (log.jsonl, TensorBoard events) and a progress bar over
        # progress_total targets of all epochs (0: no ETA; progress_total also measures a linear decay)
        self.runlog = RunLog(log_dir) if log_dir is not None and dist.is_main else None
        self._seen = dict(self.state.counters)  # counters at the last log line: the window's rates come from these
        # freed heap handed back to the system every heap_trim_every optimizer steps (0: never); see memory.py
        self.heap = HeapTrimmer(heap_trim_every)
        self.setup_peak_rss_mb: float | None = None  # peak resident memory before the first step (Linux)
        self._device_counters: dict[str, torch.Tensor] = {}  # see count()

    def log_scalars(self, kind: str, scalars: dict) -> None:
        """Record scalars at the current step (rank 0; e.g. dev metrics under kind "dev")."""
        if self.runlog is not None:
            self.runlog.write(kind, self.state.step, scalars)

    def _window(self) -> dict:
        """This rank's data efficiency, cache hit rate and served-row age since the last call."""
        now, was = self.read_counters(), self._seen
        d = {k: now.get(k, 0.0) - was.get(k, 0.0) for k in ("valid_tokens", "padded_tokens", "cache_lookups",
                                                             "cache_hits", "served_age_sum")}
        self._seen = dict(now)
        tokens = d["valid_tokens"] + d["padded_tokens"]
        return {"data_efficiency": d["valid_tokens"] / tokens if tokens else None, "valid_tokens": d["valid_tokens"],
                "cache_hit_rate": d["cache_hits"] / d["cache_lookups"] if d["cache_lookups"] else None,
                "served_age_mean": d["served_age_sum"] / d["cache_hits"] if d["cache_hits"] else None}

    def planned_fraction(self) -> float:
        """How far the run is through its plan: optimizer steps of max_steps, or targets of progress_total
        (all epochs), whichever ends it first. The same on every rank (targets are counted globally), so a
        schedule that follows it stays in step across ranks and resumes exactly; time limits do not enter it."""
        f = 0.0
        if self.max_steps:
            f = self.state.step / self.max_steps
        if self.progress_total:
            f = max(f, self.state.targets_seen / self.progress_total)
        return min(f, 1.0)

    def _set_lr(self) -> None:
        f = min(1.0, (self.state.step + 1) / self._warmup) if self._warmup else 1.0
        if self.lr_schedule == "linear":  # down to zero at the end of the plan
            f *= 1.0 - self.planned_fraction()
        for g, lr in zip(self.optimizer.param_groups, self._base_lr):
            g["lr"] = lr * f

    def count(self, counters: dict) -> None:
        """Accumulate a step's counters: summed, except names ending in _max or _min (extremes). A counter may be a
        device tensor (e.g. a loss term): it is accumulated on the device and read into ``state.counters`` only when
        they are read (log lines, evaluation, checkpoints, the end of training), so the step never waits for it."""
        c, dev = self.state.counters, self._device_counters
        for k, v in counters.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().double().reshape(())
                old = dev.get(k)
                dev[k] = v if old is None else (torch.maximum(old, v) if k.endswith("_max") else
                                                torch.minimum(old, v) if k.endswith("_min") else old + v)
                continue
            if k.endswith("_max"):
                c[k] = max(c.get(k, float("-inf")), float(v))
            elif k.endswith("_min"):
                c[k] = min(c.get(k, float("inf")), float(v))
            else:
                c[k] = c.get(k, 0.0) + float(v)

    def read_counters(self) -> dict[str, float]:
        """``state.counters``, with the device counters accumulated since the last call read in (a sync)."""
        pending, self._device_counters = self._device_counters, {}
        if pending:
            self.count({k: float(v) for k, v in pending.items()})
        return self.state.counters

    def train_seconds(self) -> float:
        """Seconds spent in the training loop so far (evaluation and checkpoints excluded)."""
        running = 0.0 if self._loop_start is None else time.perf_counter() - self._loop_start - self._excluded
        return self.state.wall_seconds + running

    def stop(self) -> None:
        """Ask the loop to stop after the current step (e.g. early stopping); every rank must call it alike."""
        self._stop = True

    def _rank0_says(self, flag: bool) -> bool:
        """All ranks must take time-based decisions at the same step: rank 0's clock decides."""
        t = torch.tensor([float(flag)], device=self.dist.device)
        if self.dist.active:
            torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def done(self) -> bool:
        if self._stop:
            return True
        if self.max_steps and self.state.step >= self.max_steps:
            return True
        if self.max_seconds and self._loop_start is not None:
            return self._rank0_says(self.train_seconds() >= self.max_seconds)
        return False

    def _periodic_due(self) -> bool:
        if self.periodic is None:
            return False
        if self.periodic_every and self.state.step % self.periodic_every == 0:
            return True
        if self.periodic_seconds:
            due = self._rank0_says(self.train_seconds() >= self._next_periodic)
            if due:
                while self._next_periodic <= self.train_seconds():
                    self._next_periodic += self.periodic_seconds
            return due
        return False

    def fit(self, epochs: int, make_batches: Callable[[int, int], Iterator],
            step_fn: Callable[[object | None], StepOutput]) -> TrainState:
        """Train for ``epochs`` epochs (or until max_steps). ``make_batches(epoch, skip)`` yields this rank's
        micro-batches of an epoch, skipping the first ``skip`` (resume). ``step_fn(None)`` is called when this
        rank has run out of batches while another has not, so that collectives stay matched."""
        st = self.state
        device = self.dist.device
        if self.setup_peak_rss_mb is None:  # what setup (data, tokens, models) took; the training peak starts here
            self.setup_peak_rss_mb = peak_rss_mb()
            reset_peak_rss()
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        window_targets = 0.0
        micro = 0
        t_log, clicks_log, loss_log, n_log = time.perf_counter(), 0.0, 0.0, 0.0
        bar = progress(self.progress_total, "training", self.progress_unit, enabled=self.dist.is_main)
        if st.targets_seen:
            bar.update(st.targets_seen)  # a resumed run starts where it stopped
        while st.epoch < epochs and not self.done():
            batches = make_batches(st.epoch, st.batches_done)
            t0 = self._loop_start = time.perf_counter()
            self._excluded = excluded = 0.0
            self.model.train()
            while not self.done():
                comm_mark = COMM_BYTES[0]
                batch = next(batches, None)
                # one collective per micro-batch on several ranks: whether anyone still has a batch, and the
                # global targets when every rank's batch says how many it holds (see _agree)
                anyone, targets = self._agree(batch)
                if not anyone:
                    break  # every rank has finished the epoch
                # DDP all-reduces the gradients while the backward runs, at the last micro-batch of a window
                sync = (micro + 1) % self.grad_accum == 0
                with self._no_sync(not sync), autocast_context(device, self.amp):
                    out = self._forward(step_fn, batch)
                if targets is None and not self.dist.active:
                    targets = float(out.targets)
                elif targets is None:  # some rank's batch does not say its targets before the step: reduce them now
                    targets = float(all_reduce_sum(torch.tensor([float(out.targets)], dtype=torch.float64,
                                                                device=device)).item())
                else:
                    assert batch is None or out.targets == batch.num_targets, "the step trained other targets"
                with self._no_sync(not sync):
                    if out.loss_sum is not None:
                        out.loss_sum.float().backward()
                if out.loss_sum is not None:
                    loss_acc += out.loss_sum.detach().double()  # stays on the device until a log line reads it
                if batch is not None:
                    st.batches_done += 1
                self.count(out.counters)
                window_targets += targets
                st.targets_seen += targets
                bar.update(targets)
                micro += 1
                if micro % self.grad_accum:
                    self.count({"collective_bytes": COMM_BYTES[0] - comm_mark})
                    continue
                self._optimizer_step(window_targets, synced=True)
                # DDP all-reduced every trainable gradient in its buckets during the backward (unused ones too)
                self.count({"collective_bytes": COMM_BYTES[0] - comm_mark + (self._grad_bytes if self.ddp else 0)})
                clicks_log += window_targets
                n_log += window_targets
                window_targets = 0.0
                if self.after_step is not None:
                    self.after_step(st.step)
                if self.log_every and st.step % self.log_every == 0:  # every rank: the loss is all-reduced
                    loss_log = float(all_reduce_sum(loss_acc.clone()))
                    loss_acc.zero_()
                    if self.dist.is_main:
                        dt = time.perf_counter() - t_log
                        scalars = {"loss": loss_log / max(n_log, 1.0), "lr": self.optimizer.param_groups[0]["lr"],
                                   "targets_per_second": clicks_log / max(dt, 1e-9), "epoch": st.epoch,
                                   **self._window()}
                        # this rank's real tokens encoded per second in the window
                        scalars["tokens_per_second"] = scalars.pop("valid_tokens") / max(dt, 1e-9)
                        log.info("step %d  epoch %d  loss %.4f  targets/s %.1f  lr %.2e%s", st.step, st.epoch,
                                 scalars["loss"], scalars["targets_per_second"], scalars["lr"], _extras(scalars))
                        bar.set_postfix_str(f"loss {scalars['loss']:.4f}{_extras(scalars)}", refresh=False)
                        self.log_scalars("train", scalars)
                    t_log, clicks_log, n_log = time.perf_counter(), 0.0, 0.0
                self._excluded = excluded
                if self._periodic_due():  # before this step's checkpoint, which then holds what it found (a dev curve)
                    excluded += self.periodic(st.step)
                    self.model.train()
                    self._excluded = excluded
                if self.checkpoint_every and st.step % self.checkpoint_every == 0 and self.checkpoint_fn:
                    tc = time.perf_counter()
                    self.checkpoint_fn(self)
                    excluded += time.perf_counter() - tc
                self._excluded = excluded
            if micro % self.grad_accum:  # a partial accumulation window at the end of the epoch
                comm_mark = COMM_BYTES[0]
                self._optimizer_step(window_targets, synced=False)
                self.count({"collective_bytes": COMM_BYTES[0] - comm_mark})
                clicks_log += window_targets
                n_log += window_targets
                window_targets = 0.0
                micro = 0
                if self.after_step is not None:
                    self.after_step(st.step)
            st.wall_seconds += time.perf_counter() - t0 - excluded
            self._loop_start = None
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            if self.done():
                break
            st.epoch += 1
            st.batches_done = 0
        self.read_counters()
        bar.close()
        return st

    def _agree(self, batch) -> tuple[bool, float | None]:
        """(does any rank still have a batch, the global training targets of this micro-batch or None if some
        rank's batch does not say before its step). One process: known on the host, no collective. Several ranks:
        one all-reduce of [has a batch, its targets, it says them] and one read of its result, the only wait for
        the device a micro-batch needs (control flow and the learning-rate schedule depend on them)."""
        says = batch is None or hasattr(batch, "num_targets")
        mine = 0 if batch is None else batch.num_targets if says else 0
        if not self.dist.active:
            return batch is not None, float(mine) if says else None
        t = torch.tensor([float(batch is not None), float(mine), float(says)], dtype=torch.float64,
                         device=self.dist.device)
        all_reduce_sum(t)
        has, targets, saying = t.tolist()  # the host waits for every rank's part: a synchronizing round
        SYNC_ROUNDS[0] += 1
        return has > 0, targets if saying == self.dist.world else None

    def _no_sync(self, skip: bool):
        return self.ddp.no_sync() if self.ddp is not None and skip else contextlib.nullcontext()

    def _forward(self, step_fn, batch) -> StepOutput:
        if self.ddp is None:
            return step_fn(batch)
        self._step_module.fn = step_fn
        return self.ddp(batch)

    def _optimizer_step(self, global_targets: float, synced: bool = False) -> None:
        """Gradients -> the sum over ranks and micro-batches of every target's gradient, divided by the global
        number of targets, then clip and step. DDP has averaged them over ranks during the backward (``synced``);
        a partial window at an epoch's end was accumulated without sync and is reduced here."""
        for p in self.params:
            if p.grad is None:  # cleared by someone else: a parameter the step did not reach steps with zeros
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse:  # arrived sparse into a cleared gradient
                p.grad = p.grad.to_dense()
        if not self.dist.active:  # one process: per target
            torch._foreach_mul_([p.grad for p in self.params], 1.0 / max(global_targets, 1.0))
        elif self.ddp is None or not synced:  # sum over ranks, then per target
            reduce_gradients(self.params, 1.0 / max(global_targets, 1.0))
        else:  # DDP averaged over ranks: back to the sum, then per target
            scale = self.dist.world / max(global_targets, 1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if self.grad_hook is not None:
            self.grad_hook()
        if self.grad_clip > 0:
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.state.step += 1
        self._set_lr()
        took = self.heap.maybe_trim(self.state.step)
        if took is not None:
            self.count({"heap_trims": 1, "heap_trim_seconds": took})


def _extras(s: dict) -> str:
    """The window's data efficiency and cache figures, for a log line (empty where they do not apply)."""
    out = ""
    if s.get("data_efficiency") is not None:
        out += f"  data eff {s['data_efficiency']:.1%}"
    if s.get("cache_hit_rate") is not None:
        out += f"  cache hits {s['cache_hit_rate']:.1%}"
    return out


def checkpoint_state(trainer: Trainer) -> tuple[dict, dict]:
    """(shared, own): the model and optimizer (the same on every rank), and this rank's progress: RNG states,
    loader position, counters, loop time."""
    st = trainer.state
    shared = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(), "epoch": st.epoch}
    own = {"rng": rng_state(), "step": st.step, "epoch": st.epoch, "batches_done": st.batches_done,
           "counters": dict(trainer.read_counters()), "wall_seconds": st.wall_seconds, "targets_seen": st.targets_seen}
    return shared, own


def restore_state(trainer: Trainer, shared: dict, own: dict) -> None:
    trainer.model.load_state_dict(shared["model"])
    trainer.optimizer.load_state_dict(shared["optimizer"])
    trainer.optimizer_clock.restart_from_state()
    st = trainer.state
    st.step, st.epoch, st.batches_done = own["step"], own["epoch"], own["batches_done"]
    st.counters = dict(own["counters"])
    st.wall_seconds = float(own["wall_seconds"])
    st.targets_seen = float(own["targets_seen"])
    trainer._seen = dict(st.counters)
    trainer._set_lr()
    set_rng_state(own["rng"])

