"""Run every benchmark, then rewrite the README's benchmark section from the results:
``python -m benchmarks.run [--quick]``. Run them on an otherwise idle machine."""
from __future__ import annotations

import sys

from benchmarks import (context, data_efficiency, limit, multiteacher, pipeline, quality, readme, speedup,
                        token_store)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = ["--quick"] if "--quick" in argv else []
    token_store.main(quick)
    data_efficiency.main(quick)
    speedup.main(quick)
    limit.main(quick)
    context.main(quick)
    multiteacher.main(quick)
    pipeline.main(quick)
    quality.main(quick)
    readme.main([])  # quick results are not the README's: it reads the full ones only


if __name__ == "__main__":
    main()
