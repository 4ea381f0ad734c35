"""Run every benchmark, then rewrite the README's benchmark section from the results:
``python -m benchmarks.run [--quick]``. Run them on an otherwise idle machine.

Full mode on this machine (2 cores), about 15.5 hours: speedup about 2.5 h, quality about 70 min per seed for the
2-layer pipeline plus about 30 min per seed for each other student size (3 seeds, sizes 1, 2 and 4), multiteacher
about 70 min, tune about 90 min, context about 60 min, pipeline about 40 min, cache about 55 min per seed, scaling
about 22 min, buslm 12 min, scale about 10 min, data_efficiency 5 min, limit 4 min (tune and cache estimated: measured at 65 and 30 min
before the default became 4 negatives per click, which halves the targets per second). Tiny-NewsRec's other experiments
(ablation, kd_methods, teacher_count, efficiency, student_gap) share each seed's base run (~54 min) through one --out
and add, estimated from their steps' times, about 8-10 hours per seed (kd_methods' joint NewsBERT-MT and MT-BERT
jobs, not timed yet, are the largest guess): a few sessions each, as each records its runs for the next. Each run records its duration; the README's durations
table shows them. ``--quick`` checks every harness on tiny random models and leaves the README alone; its
durations go to ``results/run_durations.json`` too.
"""
from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time

from benchmarks import readme
from benchmarks.common import BENCHMARK_ORDER, RESULTS, SHARED_OUT, machine

BENCHMARKS = tuple(importlib.import_module(f"benchmarks.{name}") for name in BENCHMARK_ORDER)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = ["--quick"] if "--quick" in argv else []
    info, seconds = machine(), {}
    with tempfile.TemporaryDirectory() as shared:  # the base runs the Tiny-NewsRec experiments share
        for bench in BENCHMARKS:
            name = bench.__name__.split(".")[-1]
            t0 = time.perf_counter()
            bench.main(quick + (["--out", shared] if name in SHARED_OUT else []))
            seconds[name] = round(time.perf_counter() - t0, 1)
    # kept beside the results (quick ones included: they show what --quick costs), one entry per mode
    path = RESULTS / "run_durations.json"
    durations = json.loads(path.read_text()) if path.exists() else {}
    durations["quick" if quick else "full"] = {"machine": info, "seconds": seconds,
                                               "total_seconds": round(sum(seconds.values()), 1)}
    path.write_text(json.dumps(durations, indent=2) + "\n")
    print(f"all benchmarks: {sum(seconds.values()) / 60:.1f} min", flush=True)
    if not quick:
        readme.main([])  # quick results are not the README's: it reads the full ones only


if __name__ == "__main__":
    main()
