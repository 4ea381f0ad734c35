"""Faults and exact resumption: a run killed (SIGKILL) at a random moment and resumed ends with the metrics and
counters of an uninterrupted run, on 1 rank and, through torchrun's elastic restart, on 2 ranks with uneven
shards, global dedup and bf16 autocast; unreadable checkpoints are skipped with a warning; a changed config
is refused."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, tiny_overrides
from speedyrec.train import main

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
# counters that must match exactly: the same targets trained, the same news encoded, the same cache reads
COUNTERS = ("clicks_trained", "sequences_trained", "news_encoded", "cache_lookups", "cache_hits", "valid_tokens",
            "padded_tokens", "negatives_random", "steps", "collective_bytes")
# dropout on, a small token budget so that a run has many steps, the cache reading from the start
COMMON = ("data.title_tokens=16", "engine.token_budget=1500", "engine.cache_beta=0.5", "model.dropout=0.1",
          "eval.max_impressions=60", "train.checkpoint_every=2")


def args(out: Path, cache_dir: Path, data: Path, *extra: str) -> list[str]:
    return tiny_overrides(out, cache_dir, "data.format=synthetic", f"data.dir={data}", *COMMON, *extra)


def read(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "stats.json").read_text())


def assert_same_run(a: Path, b: Path) -> None:
    (ma, sa), (mb, sb) = read(a), read(b)
    for k in METRICS:
        assert abs(ma[k] - mb[k]) <= 1e-6, (k, ma[k], mb[k])
    assert {k: sa[k] for k in COUNTERS} == {k: sb[k] for k in COUNTERS}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path} appeared: nothing was interrupted")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
         "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir, synthetic_small):
    """The uninterrupted 1-rank run everything is compared with."""
    out = tmp_path_factory.mktemp("straight")
    assert main(args(out, cache_dir, synthetic_small, "train.keep_checkpoints=0")) == 0
    return out


def test_sigkill_then_resume_ends_as_an_uninterrupted_run(tmp_path, cache_dir, synthetic_small, straight):
    steps = read(straight)[1]["steps"]
    assert steps >= 10  # enough steps that the kill lands mid-run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "speedyrec.train", "--quiet", *args(out, cache_dir, synthetic_small)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "checkpoints" / "step_4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert main(args(out, cache_dir, synthetic_small, "train.resume=auto")) == 0
    assert_same_run(out, straight)


def test_an_unreadable_checkpoint_is_skipped_with_a_warning(tmp_path, cache_dir, synthetic_small, straight):
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    for f in ("metrics.json", "stats.json"):
        (out / f).unlink()
    ckpts = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    newest, before = ckpts[-1], ckpts[-2]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated, as a full disk would leave it
    (out / "checkpoints" / ".step_999.tmp").mkdir()  # an interrupted save: never a candidate
    assert main(args(out, cache_dir, synthetic_small, "train.resume=auto")) == 0
    log = (out / "train.log").read_text()  # the run's own log (the copied one holds the first run's lines too)
    assert f"checkpoint {newest} cannot be read" in log and "skipping it" in log
    assert f"resumed from {before}" in log
    assert_same_run(out, straight)  # continued from the one before, and still ends the same


def test_deferred_cache_gradients_resume_exactly(tmp_path, cache_dir, synthetic_small):
    """The gradients that cache hits received and no fresh encoding has taken yet are part of the state: a run
    resumed from a middle checkpoint applies them as the uninterrupted run does."""
    extra = ("engine.cache_deferred_grad=true", "engine.cache_gamma=3", "train.keep_checkpoints=0")
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    assert main(args(ref, cache_dir, synthetic_small, *extra)) == 0
    stats = read(ref)[1]
    assert stats["deferred_grad_rows"] > 0 and stats["steps"] >= 8
    shutil.copytree(ref / "checkpoints" / "step_4", out / "checkpoints" / "step_4")
    assert main(args(out, cache_dir, synthetic_small, *extra, "train.resume=auto")) == 0
    assert "resumed from" in (out / "train.log").read_text()
    assert_same_run(out, ref)
    assert read(out)[1]["deferred_grad_rows"] == stats["deferred_grad_rows"]


def _ages_agree(stats: dict) -> bool:
    return stats["cache_hits"] > 0 and abs(stats["served_age_mean"] - stats["served_stamp_age_mean"]) < 1e-9


def test_served_ages_by_the_optimizer_clock_agree_with_the_stamps_under_accumulation_and_resume(
        tmp_path, cache_dir, synthetic_small, monkeypatch):
    """The served rows' ages are read from a column written by the optimizer's own step count (a post-step hook,
    restarted from the optimizer's state on resume), the stamps that decide hits from the training loop's counter.
    With 2 micro-batches per step and across a resume the two agree and stay within gamma; a loop that counted
    micro-batches as steps, or a clock not restarted on resume, shows up as a disagreement."""
    extra = ("train.grad_accum=2", "engine.cache_gamma=3", "train.keep_checkpoints=0")
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    assert main(args(ref, cache_dir, synthetic_small, *extra)) == 0
    stats = read(ref)[1]
    assert _ages_agree(stats) and stats["served_age_max"] <= 3 and stats["steps"] >= 6
    shutil.copytree(ref / "checkpoints" / "step_4", out / "checkpoints" / "step_4")
    assert main(args(out, cache_dir, synthetic_small, *extra, "train.resume=auto")) == 0
    assert _ages_agree(read(out)[1]) and read(out)[1]["served_age_max"] <= 3
    assert_same_run(out, ref)

    # the evidence can fail: a wrong step counter (micro-batches counted as steps) ...
    from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

    with monkeypatch.context() as m:
        m.setattr(SpeedyFeedWorkflow, "after_step", lambda self, step: setattr(self, "step_no", 2 * step))
        assert main(args(tmp_path / "wrong_counter", cache_dir, synthetic_small, *extra)) == 0
    assert not _ages_agree(read(tmp_path / "wrong_counter")[1])
    # ... and a resume that forgot where the optimizer's clock stood
    from speedyrec.engine.cache import OptimizerClock

    wrong = tmp_path / "clock_not_restarted"
    shutil.copytree(ref / "checkpoints" / "step_4", wrong / "checkpoints" / "step_4")
    with monkeypatch.context() as m:
        m.setattr(OptimizerClock, "restart_from_state", lambda self: None)
        assert main(args(wrong, cache_dir, synthetic_small, *extra, "train.resume=auto")) == 0
    assert not _ages_agree(read(wrong)[1])


def test_resuming_with_other_settings_is_refused(tmp_path, cache_dir, synthetic_small, straight, capsys):
    out = tmp_path / "other"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    assert main(args(out, cache_dir, synthetic_small, "train.resume=auto", "engine.negatives=2")) == 2
    err = capsys.readouterr().err
    assert "engine.negatives" in err and "checkpoints/step_" in err and "other settings" in err


def test_a_missing_resume_path_and_an_unwritable_out_dir_say_what_to_do(tmp_path, cache_dir, synthetic_small, capsys):
    assert main(args(tmp_path / "o", cache_dir, synthetic_small, f"train.resume={tmp_path / 'none'}")) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere: the unwritable out_dir cannot be shown")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(args(locked / "run", cache_dir, synthetic_small, "train.max_steps=1")) == 2
        assert "out_dir" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


class FullDisk:
    """``safe_io.OPEN`` for a disk that takes ``capacity`` bytes in all, then fails half way through a write."""

    def __init__(self, capacity: int):
        self.left = capacity

    def __call__(self, path, mode="r", *a, **kw):
        import errno

        f = open(path, mode, *a, **kw)
        disk = self

        class Writer:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                n = len(data)
                if n > disk.left:
                    f.write(data[: disk.left])  # what fitted stays in the partial file
                    disk.left = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.left -= n
                return f.write(data)

            def flush(self):
                f.flush()

            def fileno(self):
                return f.fileno()

        return Writer()


def _checkpoint_bytes(step_dir: Path) -> int:
    meta = json.loads((step_dir / "meta.json").read_text())
    return sum(meta["files"].values()) + (step_dir / "meta.json").stat().st_size


def _disk_for_two_checkpoints(straight: Path) -> int:
    """Bytes for the first two checkpoints of the run, then half of the third's model file."""
    first = sorted((straight / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[0]
    return 2 * _checkpoint_bytes(first) + 1000 + (first / "model.safetensors").stat().st_size // 2


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_a_full_disk_while_checkpointing_loses_nothing(tmp_path, cache_dir, synthetic_small, straight, capsys,
                                                       monkeypatch, mode):
    """A checkpoint write that fails half way leaves the earlier checkpoints whole and loadable, and no partial
    directory. train.checkpoint_errors=error: the run stops naming the file and the cause, and once space is freed
    it resumes to the uninterrupted run's end; =warn: it trains on to the end and says which checkpoints it lost."""
    import hashlib

    from speedyrec.engine import checkpoint, safe_io
    from speedyrec.engine.distributed import DistInfo

    out = tmp_path / mode
    monkeypatch.setattr(safe_io, "OPEN", FullDisk(_disk_for_two_checkpoints(straight)))
    rc = main(args(out, cache_dir, synthetic_small, f"train.checkpoint_errors={mode}"))
    kept = checkpoint.step_dirs(out / "checkpoints")
    assert [p.name for p in kept] == ["step_4", "step_2"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial directory left
    digest = {f: hashlib.sha256(f.read_bytes()).hexdigest() for d in kept for f in sorted(d.iterdir())}
    directory, shared, own = checkpoint.load_newest(out / "checkpoints", DistInfo())
    assert directory == kept[0] and shared["step"] == own["step"] == 4
    if mode == "error":
        assert rc == 2
        err = capsys.readouterr().err
        assert "model.safetensors" in err and "disk is full" in err and "Earlier checkpoints are untouched" in err
        assert not (out / "metrics.json").exists()
        monkeypatch.setattr(safe_io, "OPEN", open)  # space freed: resume and finish as if nothing happened
        assert main(args(out, cache_dir, synthetic_small, "train.resume=auto")) == 0
    else:
        assert rc == 0
        log = (out / "train.log").read_text()
        assert "disk is full" in log and "Training goes on without this checkpoint" in log
        assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for d in kept for f in sorted(d.iterdir())} == digest
    assert_same_run(out, straight)


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, cache_dir, synthetic_small, straight, capsys):
    """A checkpoint in the earlier pickle format, crafted so that unpickling it creates a file: resuming from it and
    exporting it refuse it with the command that converts it, and the file is never created; the converter's
    weights-only unpickler refuses it too. A genuine old checkpoint converts and then resumes exactly."""
    import torch

    from speedyrec import checkpoint as convert_cli
    from speedyrec.engine import checkpoint
    from speedyrec.engine.distributed import DistInfo
    from speedyrec.export import main as export_main

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    out = tmp_path / "crafted"
    shutil.copytree(straight, out)
    for f in ("metrics.json", "stats.json"):
        (out / f).unlink()
    newest = checkpoint.step_dirs(out / "checkpoints")[0]
    shared = checkpoint.read_part(newest, "model")
    own = checkpoint.read_part(newest, "rank0")
    for p in newest.iterdir():
        p.unlink()
    torch.save({**shared, "x": Payload()}, newest / "model.pt")
    torch.save(own, newest / "rank0.pt")
    (newest / "meta.json").write_text(json.dumps({"step": shared["step"], "world": 1, "files": {}}))
    assert not marker.exists()  # saving does not run it; loading would
    for argv in (args(out, cache_dir, synthetic_small, "train.resume=auto"),
                 args(out, cache_dir, synthetic_small, f"train.resume={newest}")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "python -m speedyrec.checkpoint convert" in err and "earlier speedyrec as pickles" in err
    assert export_main([str(out), "--checkpoint", str(newest)]) != 0
    assert "python -m speedyrec.checkpoint convert" in capsys.readouterr().err
    assert convert_cli.main(["convert", str(newest)]) == 1
    assert "does not load as data only" in capsys.readouterr().err
    assert not marker.exists() and (newest / "model.pt").exists()  # refused, left as it was
    # a genuine old-format checkpoint: converted deliberately, it resumes to the uninterrupted run's end
    torch.save(shared, newest / "model.pt")
    assert convert_cli.main(["convert", str(out)]) == 0
    assert not list(newest.glob("*.pt")) and checkpoint.load_newest(out / "checkpoints", DistInfo())[0] == newest
    assert main(args(out, cache_dir, synthetic_small, "train.resume=auto")) == 0
    assert_same_run(out, straight)
    assert not marker.exists()


# -- 2 ranks: torchrun's elastic restart after a rank is killed --------------------------------------------------------
TWO = ("engine.global_dedup=true", "train.amp=bf16")


def torchrun_cmd(extra: list[str], restarts: int) -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}", "-m", "speedyrec.train",
            "--quiet", *extra]


def test_torchrun_restarts_the_group_after_a_rank_is_killed_and_it_ends_as_an_uninterrupted_run(
        tmp_path, cache_dir, synthetic_small):
    """Rank 1 is SIGKILLed mid-run under ``torchrun --max-restarts=1``: torchrun stops rank 0, starts the group
    again, and the new group resumes from the last checkpoint by itself (no resume key given). Uneven shards,
    global dedup and bf16 autocast; the counters show that nothing was trained twice or lost."""
    ref, out = tmp_path / "ref2", tmp_path / "restarted2"
    proc = subprocess.run(torchrun_cmd(args(ref, cache_dir, synthetic_small, *TWO), 0), env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = read(ref)[1]
    assert stats["clicks_trained"] == stats["clicks_in_data"] - stats["clicks_unknown_news"]  # the whole epoch
    run = subprocess.Popen(torchrun_cmd(args(out, cache_dir, synthetic_small, *TWO), 1), env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(out / "checkpoints" / "step_4", run)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True)
               if "speedyrec.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].kill()  # SIGKILL one rank mid-run: the group fails and torchrun restarts it
    log, _ = run.communicate(timeout=600)
    assert run.returncode == 0, log[-4000:]
    assert "torchrun restart 1" in log and "resumed from" in log, log[-4000:]
    assert_same_run(out, ref)  # nothing trained twice or lost, and the same model


def test_a_torchrun_restart_resumes_by_itself(monkeypatch):
    """The resume decision reads the attempt agreed when the group formed, not this node's restart counter."""
    from speedyrec.engine import distributed
    from speedyrec.recipes.resume import elastic_restart

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(distributed, "ATTEMPT", 0)
    assert elastic_restart() == ""
    monkeypatch.setattr(distributed, "ATTEMPT", 1)
    assert elastic_restart() == "auto"
