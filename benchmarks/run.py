"""Run every benchmark: ``python -m benchmarks.run [--quick]``. Run them on an otherwise idle machine."""
from __future__ import annotations

import sys

from benchmarks import multiteacher, quality, speedup, token_store


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = ["--quick"] if "--quick" in argv else []
    token_store.main(quick)
    speedup.main(quick)
    multiteacher.main(quick)
    quality.main(quick)


if __name__ == "__main__":
    main()
