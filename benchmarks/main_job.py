"""The README's main job, timed as a newcomer runs it: ``torchrun --standalone --nproc_per_node=2 -m speedyrec.train``
with no arguments, in an empty folder, with an empty cache (the synthetic data are generated and the titles
tokenized inside the timing, as on a first run).

``python -m benchmarks.main_job [--quick]``

Writes ``results/main_job.{json,md}``: the command's wall seconds, its parts (setup, the training loop, the final
evaluation), the precision the run resolved, its dev metrics, and ``config_hash``, the hash of the resolved default
config the timing belongs to (``speedyrec.config.defaults_digest``): the README states this time, and a test fails
once today's defaults hash otherwise, until the job is timed again. ``--quick`` runs a tiny random encoder on 300
users (a check of the harness; not the README's figure).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, md_table, write_results

COMMAND = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "speedyrec.train"]
QUICK = ["model.encoder=random:hidden=32,layers=2,heads=2,intermediate=64", "model.vocab_size=800",
         "data.synthetic_users=300", "eval.max_impressions=200"]
LIMIT_SECONDS = 600.0  # the promise: the main job finishes within ten minutes on 2 cores


def main(argv=None) -> dict:
    from speedyrec.config import defaults_digest, flat_config, load_config

    p = argparse.ArgumentParser(prog="benchmarks.main_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 300 users")
    a = p.parse_args(argv)
    info = machine()
    overrides = QUICK if a.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SPEEDYREC_CACHE": str(Path(tmp) / "cache")}  # cold: nothing generated yet
        for k in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", *COMMAND[1:], *overrides, "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"the main job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out = Path(tmp) / "runs" / "default"
        stats = json.loads((out / "stats.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        curve = json.loads((out / "dev_curve.json").read_text())["points"]
    payload = {"machine": info, "quick": a.quick, "command": " ".join([*COMMAND, *overrides]),
               "config_hash": defaults_digest(), "defaults": flat_config(load_config(None, []).to_dict()),
               "seconds": seconds, "limit_seconds": LIMIT_SECONDS,
               "train_seconds": stats["wall_seconds"], "setup_seconds": stats["setup_seconds"],
               "precision": stats["precision"], "clicks_trained": stats["clicks_trained"],
               "clicks_per_second": stats["clicks_per_second"], "world_size": stats["world_size"],
               "metrics": {k: metrics[k] for k in ("auc", "mrr", "ndcg5", "ndcg10")},
               "eval_impressions": metrics.get("impressions"), "dev_points": len(curve), "stats": stats}
    rows = [["whole command (cold cache: data generated, titles tokenized)", f"{seconds:.0f} s"],
            ["training loop", f"{stats['wall_seconds']:.0f} s ({stats['clicks_trained']:,} clicks, "
                              f"{stats['clicks_per_second']:.1f} clicks/s, {stats['precision']})"],
            ["the rest: start-up, data, tokenizer, model, final dev evaluation",
             f"{seconds - stats['wall_seconds']:.0f} s"],
            ["dev AUC / MRR / nDCG@5 / nDCG@10", " / ".join(f"{metrics[k]:.4f}" for k in ("auc", "mrr", "ndcg5", "ndcg10"))]]
    md = ["# The main job, timed\n",
          f"Device: {info['device']}, torch {info['torch']}; commit {info.get('commit', '?')}. Command (in an empty "
          f"folder, empty cache): `{payload['command']}`. Defaults hash `{payload['config_hash']}`.\n",
          md_table(["", ""], rows),
          f"\n**{seconds / 60:.1f} minutes** in all ({'within' if seconds <= LIMIT_SECONDS else 'OVER'} the "
          f"{LIMIT_SECONDS / 60:.0f}-minute promise).\n"]
    write_results("main_job_quick" if a.quick else "main_job", payload, "\n".join(md))
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
