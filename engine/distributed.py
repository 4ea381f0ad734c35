"""Process-group set-up from torchrun's environment and the few collectives the engine needs."""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    attempt: int = 0  # torchrun's restarts of this job so far, the same on every rank (see init_distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed() -> DistInfo:
    """One process on one device, or torchrun's process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Processes on one machine share its cores; oversubscribing them slows every rank down.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    attempt = _env_restart_count()
    if world > 1 and not dist.is_initialized():
        device_id = device if backend == "nccl" else None
        store, attempt = _attempt_store(world, rank, attempt)
        if store is None:
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            dist.init_process_group(backend=backend, device_id=device_id, store=store, rank=rank, world_size=world)
        attempt = _agreed_attempt(attempt, device)
    global ATTEMPT
    ATTEMPT = attempt
    return DistInfo(rank, world, local_rank, device, attempt)


ATTEMPT = 0  # this process's DistInfo.attempt, for code that has no DistInfo at hand (recipes.resume)
# bytes this process put into or got out of the collectives below: an all-reduce's or broadcast's buffer, an
# all-gather's whole output (it grows with the world size). The trainer reads it around each step.
COMM_BYTES = [0]
# Synchronizing collectives this process has completed: collectives whose result its host has read (the trainer's
# agreement before every micro-batch, barriers), so that every rank had entered them. Every rank counts the same
# ones in the same order (a collective is called by all ranks), so "rank A wrote x before its k-th, and I have
# completed my k-th" means x was written before I look (speedyrec.models.frozen_prefix shares a node's cache so).
SYNC_ROUNDS = [0]


def _comm(*tensors: torch.Tensor) -> None:
    COMM_BYTES[0] += sum(t.numel() * t.element_size() for t in tensors)
JOIN_TIMEOUT_S = float(os.environ.get("SPEEDYREC_JOIN_TIMEOUT", "300"))


def _env_restart_count() -> int:
    """torchrun's restart count for this node's agent. Not the same on every node: an agent whose own workers
    failed counts a restart, while the agent of a healthy node restarts its workers for the new membership
    without counting one. Only a hint, agreed on below."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _attempt_store(world: int, rank: int, hint: int):
    """(the store for this attempt's process group, the attempt number), when torchrun restarts groups on one
    shared store; (None, hint) where the default env:// initialisation is safe.

    torchrun's agent hosts one TCPStore for the whole job and hands it to every restarted group
    (``--max-restarts``), but the group's keys are not namespaced by attempt: the workers of a restarted group
    can read the previous attempt's peer addresses and fail to connect to a dead process. So every attempt gets
    its own namespace, and all ranks must name the same one: not from TORCHELASTIC_RESTART_COUNT, which differs
    between nodes (see _env_restart_count), but from a counter in the job's store that each global rank bumps
    once per start of its worker. Every attempt starts every rank once (torchrun stops and restarts all workers
    of all nodes together), so rank r's count is the same for every r: the attempt, agreed by construction.
    A worker that died before reaching this point would leave its count behind; the join below then times out
    with an error naming that, instead of waiting in a namespace no peer uses."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None, hint
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=default_pg_timeout)
    attempt = store.add(f"speedyrec/starts/rank_{rank}", 1) - 1
    ns = dist.PrefixStore(f"speedyrec/attempt_{attempt}/", store)
    ns.add("joined", 1)
    t0 = time.monotonic()
    while (joined := ns.add("joined", 0)) < world:
        if time.monotonic() - t0 > JOIN_TIMEOUT_S:
            raise RuntimeError(f"rank {rank}: only {joined} of {world} ranks joined attempt {attempt} of this job "
                               f"within {JOIN_TIMEOUT_S:.0f} s (SPEEDYREC_JOIN_TIMEOUT): the other ranks are in "
                               "another attempt (a worker that died before joining its group leaves its count "
                               "behind) or did not start; launch the job again")
        time.sleep(0.05)
    return ns, attempt


def _agreed_attempt(attempt: int, device: torch.device) -> int:
    """The attempt every rank uses: the largest any rank reports (agreed by a collective, so that the resume
    decision is the same everywhere even where the attempt came from a per-node counter)."""
    t = torch.tensor([attempt], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def shutdown(wait_for_others: bool = True) -> None:
    if dist.is_initialized():
        # Every rank finishes its last collective before any tears the group down; otherwise a gloo worker
        # thread can still hold finished work while its interpreter exits, which aborts the process.
        if wait_for_others:
            dist.barrier()
        # models wrapped in DistributedDataParallel and left in reference cycles go first: a reducer that
        # outlives its group is torn down at interpreter exit with its threads still running (SIGABRT)
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
        SYNC_ROUNDS[0] += 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in one process); returns t."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        _comm(t)
    return t


def all_gather_rows(t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor]:
    """Every rank's tensor t [n_r, ...] (n_r may differ by rank), in rank order. ``sizes``: every rank's n_r when
    known already (e.g. from a gather of the same rows' ids), which saves exchanging and reading them."""
    if not dist.is_initialized():
        return [t]
    world = dist.get_world_size()
    if sizes is None:
        n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
        gathered = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(gathered, n)
        _comm(*gathered)
        sizes = [int(s.item()) for s in gathered]
    width = max(sizes)
    padded = t.new_zeros((width,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    _comm(*out)
    return [o[:s] for o, s in zip(out, sizes)]


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized [width, ...] blocks into [world * width, ...]. Backward: each rank gets the sum
    over ranks of the gradient of its own block (reduce-scatter on NCCL; gloo has none, so all-reduce, slice).

    The backward is a collective inside autograd's backward pass, on the default group: the trainer runs such steps
    without DistributedDataParallel's overlapping all-reduces (``Trainer(overlap_gradient_reduce=False)``), so no
    other collective can be in flight while it runs, and every rank issues it exactly once per step."""

    @staticmethod
    def forward(ctx, block: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.width = dist.get_rank(), block.shape[0]
        out = block.new_empty((world * block.shape[0],) + tuple(block.shape[1:]))
        dist.all_gather_into_tensor(out, block.contiguous())
        _comm(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.width,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            _comm(grad)
            return out
        grad = grad.clone()
        dist.all_reduce(grad)
        _comm(grad)
        return grad[ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width]


def all_gather_with_grad(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows t [sizes[rank], ...] concatenated in rank order, with autograd: the gradient of a
    row returns to the rank that produced it. ``sizes`` (rows per rank) must be known to every rank.

    Rows travel as float32 whatever the rank computed them in: under bf16 autocast one rank's encoder gives
    bf16 while a rank that encoded nothing has a float32 empty tensor, and a collective of mixed dtypes
    aborts (gloo) or hangs (NCCL)."""
    if not dist.is_initialized():
        return t
    width = max(sizes)
    t = t.float()
    padded = torch.cat([t, t.new_zeros((width - len(t),) + tuple(t.shape[1:]))]) if width > len(t) else t
    if torch.is_grad_enabled() and not padded.requires_grad:
        # a rank that contributes nothing trainable must still record the gather, or its backward would skip
        # the collective that the other ranks' backward waits in
        padded = padded.detach().requires_grad_(True)
    gathered = _GatherRows.apply(padded)
    return torch.cat([gathered[r * width : r * width + s] for r, s in enumerate(sizes)])


def reduce_gradients(params: list[torch.nn.Parameter], scale: float) -> None:
    """Sum every parameter's gradient over ranks into one flat buffer per dtype, then multiply by ``scale``.

    Parameters without a gradient this step count as zero, so ranks that had no data still take part.
    """
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        all_reduce_sum(flat)
        flat.mul_(scale)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_bytes(data: bytes | None, device: torch.device) -> bytes:
    """Rank 0's ``data`` on every rank (the others pass None); the bytes themselves, never a pickle."""
    if not dist.is_initialized():
        return data or b""
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if dist.get_rank() == 0 and n.item()
           else torch.zeros(int(n.item()), dtype=torch.uint8, device=device))
    if n.item():
        dist.broadcast(buf, 0)
    return bytes(buf.cpu().numpy().tobytes())


_VIEWS: dict[str, bool] = {}


def sees_rank0_directory(directory, device: torch.device, tag: str = "view") -> bool:
    """Whether this rank sees the directory rank 0 sees at the same path (collective): rank 0 writes a fresh
    random token into ``directory/.speedyrec_<tag>``, broadcasts it, and each rank reads the file back. False
    where the path is another filesystem's (another node's local disk). Remembered per directory."""
    from pathlib import Path

    directory = Path(directory)
    key = f"{directory.resolve()}|{tag}"
    if not dist.is_initialized():
        return True
    if key in _VIEWS:
        return _VIEWS[key]
    token = None
    if dist.get_rank() == 0:
        token = os.urandom(16).hex().encode()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f".speedyrec_{tag}").write_bytes(token)
    token = broadcast_bytes(token, device)
    try:
        seen = (directory / f".speedyrec_{tag}").read_bytes() == token
    except OSError:
        seen = False
    _VIEWS[key] = seen
    return seen


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (collective)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
