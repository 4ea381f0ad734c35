"""Tiny-NewsRec end to end, timed: ``python -m speedyrec.train stage=pipeline`` on the synthetic default.

``python -m benchmarks.pipeline [--quick] [--out DIR]``

M = 4 all-MiniLM-L6-v2 teachers and a 2-layer student, the defaults of every stage (no baselines). Writes
``benchmarks/results/pipeline.{json,md}``: the pipeline's own table (every teacher and the student with
AUC/MRR/nDCG, the wall time of each step) and the whole process's wall time.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import machine, run_job, write_results
from benchmarks.quality import QUICK


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 users, 2 teachers, a few steps per stage")
    p.add_argument("--out", default="", help="keep the run (logs, checkpoints) here (default: a temporary folder)")
    a = p.parse_args(argv)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        run = run_job("pipeline", ["stage=pipeline", *(QUICK if a.quick else [])], root, timeout=4 * 3600)
        table = (root / "pipeline" / "pipeline.md").read_text()
    summary = run["metrics"]
    payload = {"machine": info, "quick": a.quick, "command": run["command"], "process_seconds": run["process_seconds"],
               "summary": summary}
    md = ["# stage=pipeline: Tiny-NewsRec end to end\n",
          f"Device: {info['device']}, torch {info['torch']}. Command: `python {run['command']}`; the whole process "
          f"took {run['process_seconds'] / 60:.1f} min (data and tokenizer included).\n", table]
    write_results("pipeline_quick" if a.quick else "pipeline", payload, "\n".join(md))
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
