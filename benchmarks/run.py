"""Run every benchmark, then rewrite the README's benchmark section from the results:
``python -m benchmarks.run [--quick]``. Run them on an otherwise idle machine.

Full mode on this machine (2 cores): speedup about 75 min, buslm 12 min and limit 4 min (measured); tune about
60 min, cache about 40 min, scaling about 35 min, data_efficiency 5 min, context about 60 min, multiteacher about
60 min, pipeline about 45 min, and quality about 77 min per seed for the 2-layer pipeline plus about 30 min per
seed for each other student size (3 seeds, sizes 1, 2 and 4) (estimated from their runs' parts): about 14 hours
in all.
``--quick`` checks every harness on
tiny random models (a few minutes each) and leaves the README alone.
"""
from __future__ import annotations

import sys

from benchmarks import (buslm, cache, context, data_efficiency, limit, multiteacher, pipeline, quality, readme,
                        scaling, speedup, token_store, tune)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = ["--quick"] if "--quick" in argv else []
    token_store.main(quick)
    data_efficiency.main(quick)
    speedup.main(quick)
    tune.main(quick)  # reads the typical workflow's best AUC from speedup's results
    cache.main(quick)
    buslm.main(quick)
    scaling.main(quick)
    limit.main(quick)
    context.main(quick)
    multiteacher.main(quick)
    pipeline.main(quick)
    quality.main(quick)
    if not quick:
        readme.main([])  # quick results are not the README's: it reads the full ones only


if __name__ == "__main__":
    main()
