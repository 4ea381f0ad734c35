"""Files that load without running code: every kind of state a checkpoint holds comes back equal and of the same
type; what cannot be stored as data is refused by name; a pickle is recognised without being opened."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from speedyrec.engine.checkpoint import rng_state
from speedyrec.engine.safe_io import is_pickle, load_tree, pack, save_tree, unpack


def _same(a, b, where="top"):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert not (a.requires_grad or b.requires_grad), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_a_trainers_state_round_trips_with_its_types(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4))
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # two names, one storage only by a view
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
             "gen": np.random.default_rng(7).bit_generator.state, "counters": {"clicks": 3.0, "nan": float("nan")},
             "np_scalars": [np.float64(0.1), np.int64(2**40), np.float32(1.5), np.bool_(True)],
             "arrays": {"u32": np.arange(5, dtype=np.uint32), "bool": np.array([True, False]), "empty": np.zeros(0)},
             "bf16": torch.randn(3, dtype=torch.bfloat16), "dtype": torch.bfloat16, "scalar": torch.tensor(5),
             "slice": torch.arange(10)[2:5], "__dunder__": 1, (1, "a"): "tuple key", 3: None}
    save_tree(state, tmp_path / "s")
    back = load_tree(tmp_path / "s")
    _same(state, back)
    assert back["model"]._metadata == state["model"]._metadata  # module versions, which load_state_dict reads
    # what comes back drives the same objects: the optimizer and the RNGs continue as they would have
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    from speedyrec.engine.checkpoint import set_rng_state

    set_rng_state(back["rng"])
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_what_is_not_data_is_refused_by_its_place_in_the_tree(tmp_path):
    class Thing:
        pass

    with pytest.raises(TypeError, match=r"Thing at workflow\.cache\[1\]"):
        pack({"workflow": {"cache": [1, Thing()]}}, {})
    with pytest.raises(TypeError, match="numpy array of Python objects at x"):
        pack({"x": np.array([object()])}, {})
    with pytest.raises(TypeError, match="function"):
        save_tree({"f": lambda: 0}, tmp_path / "f")
    assert not (tmp_path / "f.safetensors").exists()


def test_a_pickle_is_recognised_by_its_first_bytes(tmp_path):
    torch.save({"a": 1}, tmp_path / "zip.pt")
    torch.save({"a": 1}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_tree({"a": torch.ones(1)}, tmp_path / "new")
    assert is_pickle(tmp_path / "zip.pt") and is_pickle(tmp_path / "legacy.pt")
    assert not is_pickle(tmp_path / "new.safetensors") and not is_pickle(tmp_path / "new.json")
    assert unpack(pack([1, (2,)], {}), {}) == [1, (2,)]
    # a safetensors header of 128 + 256k bytes starts with 0x80, as a pickle does: still not a pickle
    from safetensors.torch import save_file

    for n in range(1, 400):
        save_file({f"w{i}": torch.zeros(1) for i in range(n)}, tmp_path / "t.safetensors")
        if (tmp_path / "t.safetensors").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "t.safetensors").read_bytes()[:1] == b"\x80"
    assert not is_pickle(tmp_path / "t.safetensors")


def _failing_rank_worker(rank, world, init_file, root, failing_rank, out_dir):
    import errno
    import json as _json

    import torch.distributed as dist

    from speedyrec.engine import checkpoint, safe_io
    from speedyrec.engine.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    shared, own = {"model": {"w": torch.ones(3)}}, {"rng": rng_state()}
    checkpoint.save(Path(root), info, 1, shared, own)  # a good one first
    if rank == failing_rank:
        def full_disk(path, mode="r", *a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")
        safe_io.OPEN = full_disk
    try:
        checkpoint.save(Path(root), info, 2, shared, own)
        outcome = "saved"
    except checkpoint.CheckpointError as e:  # every rank, not only the one whose disk failed
        outcome = str(e)
    Path(out_dir, f"rank{rank}.json").write_text(_json.dumps(outcome))
    dist.destroy_process_group()


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_rank_that_cannot_write_its_part_stops_every_rank_alike(tmp_path, failing_rank):
    """Two gloo ranks; one cannot write its part of a checkpoint: both raise CheckpointError (none waits at a
    barrier for the other), the partial directory is gone and the earlier checkpoint is whole."""
    import json

    import torch.multiprocessing as mp

    from speedyrec.engine import checkpoint

    root = tmp_path / "checkpoints"
    mp.spawn(_failing_rank_worker, args=(2, str(tmp_path / "init"), str(root), failing_rank, str(tmp_path)), nprocs=2,
             join=True)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(o != "saved" for o in outcomes)
    assert "disk is full" in outcomes[failing_rank]
    assert f"rank {failing_rank} could not write its part" in outcomes[1 - failing_rank]
    assert [p.name for p in root.iterdir()] == ["step_1"]
    assert checkpoint.read_part(root / "step_1", "model")["model"]["w"].tolist() == [1.0, 1.0, 1.0]
