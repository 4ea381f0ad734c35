import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and OpenMP threads stall badly when the machine is busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The team's real data samples: ``shared/data`` beside the repository (or $SPEEDYREC_SHARED_DATA)."""
    env = os.environ.get("SPEEDYREC_SHARED_DATA")
    if env:
        return Path(env)
    for parent in REPO.parents:
        cand = parent / "shared" / "data"
        if (cand / "mind_sample").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data samples not found: expected ../shared/data beside the repo or $SPEEDYREC_SHARED_DATA")
    return d


@pytest.fixture(scope="session")
def mind_sample(shared_data) -> Path:
    return shared_data / "mind_sample"


@pytest.fixture(scope="session")
def speedyrec_sample(shared_data) -> Path:
    return shared_data / "speedyrec_example"


TINY_ENCODER = "random:hidden=32,layers=2,heads=2,intermediate=64"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token/vocabulary cache for the whole session (the tests that check invalidation use their own)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    """A small synthetic MIND-format data set shared by the end-to-end tests."""
    from speedyrec.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, users=300, seed=1)
    return out


def tiny_overrides(out_dir, cache_dir, *extra) -> list[str]:
    return [f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", f"model.encoder={TINY_ENCODER}",
            "model.dim=32", "model.attention_dim=16", "model.vocab_size=800", "train.log_every=0", *extra]
