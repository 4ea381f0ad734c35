"""Several nodes, as two torchrun launches on localhost (one worker each, c10d rendezvous): a worker killed mid-epoch
is restarted with its peer in one restart, and the run ends as an uninterrupted one; each node may keep its own
caches; nodes that do not share out_dir stop at once with an error saying so."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_resume import TWO, args, assert_same_run, env, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def node(port: int, restarts: int, overrides: list[str], log: Path) -> subprocess.Popen:
    """One of two nodes: one worker, rendezvous on localhost:port."""
    cmd = [*launcher(), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id=speedyrec-{port}", f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m",
           "speedyrec.train", "--quiet", *overrides]
    return subprocess.Popen(cmd, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600.0) -> list[int]:
    t0 = time.time()
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the nodes did not finish:\n" + "\n".join(f.read_text()[-3000:] for f in logs))
    return [p.returncode for p in procs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, synthetic_small):
    """The uninterrupted 2-rank run (one launch, two workers)."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    cmd = [*launcher(), "--standalone", "--nproc_per_node=2", "-m", "speedyrec.train", "--quiet",
           *args(out, cache_dir, synthetic_small, *TWO)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_nodes_restart_together_after_a_worker_is_killed(tmp_path, cache_dir, synthetic_small, reference):
    """Node B's worker is SIGKILLed mid-epoch under --max-restarts=1. torchrun counts a restart on B's agent only
    (A's agent restarts its worker for the new membership without counting one), so the two workers start again
    with different TORCHELASTIC_RESTART_COUNTs; they still form one group, agree that this is a restart, resume
    from the last checkpoint and end with the uninterrupted run's metrics and counters. Each node has its own
    cache directory, seeded with the reference's tokenizer (WordPiece training is not deterministic: see
    test_nodes_with_their_own_caches_use_rank_0s_tokenizer) and building its own token store."""
    out, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    for k in "ab":
        shutil.copytree(cache_dir / "tokenizers", tmp_path / f"cache_{k}" / "tokenizers")
    procs = [node(port, 1, args(out, tmp_path / f"cache_{k}", synthetic_small, *TWO), log)
             for k, log in zip("ab", logs)]
    wait_for(out / "checkpoints" / "step_4", procs[0])
    victims = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)
               if "speedyrec.train" in " ".join(c.cmdline()) and c.environ().get("RANK") == "1"]
    assert len(victims) == 1
    victims[0].kill()
    assert finish(procs, logs) == [0, 0], "\n".join(f.read_text()[-3000:] for f in logs)
    text = "\n".join(f.read_text() for f in logs)
    assert "torchrun restart 1" in text and "resumed from" in text, text[-4000:]
    assert_same_run(out, reference)
    # the replicated embedding cache is saved once, in the shared part, not once per rank
    from speedyrec.engine.checkpoint import read_part, step_dirs

    newest = step_dirs(out / "checkpoints")[0]
    shared = read_part(newest, "model", torch.device("cpu"))
    assert len(shared["workflow_cache"]["rows"]) > 0 and not shared["workflow_cache"]["sharded"]
    for r in (0, 1):
        assert "cache" not in read_part(newest, f"rank{r}", torch.device("cpu")).get("workflow", {})
    # collective bytes per step: at least every trainable gradient (summed over ranks at each step; the optimizer
    # holds one moment per trainable parameter, an independent count of them), plus a little for the batch's gathers
    grads = sum(v["exp_avg"].numel() * v["exp_avg"].element_size() for v in shared["optimizer"]["state"].values())
    per_step = json.loads((out / "stats.json").read_text())["collective_bytes_per_step"]
    assert grads <= per_step <= grads + 2_000_000, (grads, per_step)
    # each node built its own token store, in its own cache directory
    for k in "ab":
        assert list((tmp_path / f"cache_{k}" / "tokens").iterdir())


def test_nodes_with_their_own_caches_use_rank_0s_tokenizer(tmp_path, synthetic_small):
    """Two nodes with empty node-local caches: rank 0 trains the tokenizer and the other node writes the same
    file into its cache (trained there, it would be another vocabulary, so the ranks would read other tokens)."""
    out, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [node(port, 0, args(out, tmp_path / f"cache_{k}", synthetic_small, "train.max_steps=2"), log)
             for k, log in zip("ab", logs)]
    assert finish(procs, logs) == [0, 0], "\n".join(f.read_text()[-3000:] for f in logs)
    files = [sorted((tmp_path / f"cache_{k}" / "tokenizers").glob("*.json")) for k in "ab"]
    assert len(files[0]) == len(files[1]) == 1 and files[0][0].read_bytes() == files[1][0].read_bytes()


def test_nodes_that_do_not_share_out_dir_stop_at_once(tmp_path, cache_dir, synthetic_small):
    port = free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    t0 = time.time()
    procs = [node(port, 0, args(tmp_path / f"out_{k}", cache_dir, synthetic_small), log) for k, log in zip("ab", logs)]
    codes = finish(procs, logs, timeout=300)
    took = time.time() - t0
    text = "\n".join(f.read_text() for f in logs)
    assert codes != [0, 0] and "out_dir must be one directory shared by every node" in text, text[-3000:]
    assert not (tmp_path / "out_a" / "metrics.json").exists() and not (tmp_path / "out_b" / "metrics.json").exists()
    assert took < 120, took  # start-up and the check, not a collective's timeout


def test_a_node_s_ranks_share_one_frozen_prefix_cache(tmp_path, cache_dir, synthetic_small):
    """Two ranks of one node with frozen layers map one frozen-prefix cache in engine.frozen_cache_dir: the run
    ends with the metrics of the same run without the cache (each rank serves the other's rows only once they
    are whole), the node computes each news about once (two ranks with caches of their own would compute the
    news both train on twice), and nothing is left in the folder."""
    common = ("model.freeze_layers=1", "train.amp=off", "train.max_steps=6", "train.checkpoint_every=0")
    runs = {}
    for cached in ("true", "false"):
        out = tmp_path / f"cache_{cached}"
        cmd = [*launcher(), "--standalone", "--nproc_per_node=2", "-m", "speedyrec.train", "--quiet",
               *args(out, cache_dir, synthetic_small, *common, f"engine.frozen_cache={cached}",
                     f"engine.frozen_cache_dir={tmp_path / 'scratch'}")]
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[cached] = (json.loads((out / "metrics.json").read_text()), json.loads((out / "stats.json").read_text()))
    (m_on, s_on), (m_off, s_off) = runs["true"], runs["false"]
    for k in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert abs(m_on[k] - m_off[k]) <= 1e-6, (k, m_on[k], m_off[k])
    assert s_on["news_encoded"] == s_off["news_encoded"] and "frozen_news_computed" not in s_off
    assert s_on["frozen_cache_bytes_per_node"] > 0 and "frozen_cache_bytes_per_node" not in s_off
    news = len({line.split("\t", 1)[0] for split in ("train", "dev")
                for line in (synthetic_small / split / "news.tsv").open()})
    stored = s_on["frozen_news_computed"] - s_on["frozen_news_pending"]
    print("frozen cache:", {k: v for k, v in s_on.items() if k.startswith("frozen_")}, "news", news)
    assert s_on["frozen_news_served"] > 0 and stored <= news * 1.1, (stored, news)
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]
