"""Several ranks: each rank builds and keeps only its own users' sequences (speedyrec.data.behaviors.user_share)."""
from __future__ import annotations

import numpy as np
import pytest

from speedyrec.data.behaviors import user_owners, user_share
from speedyrec.data.dataset import load_dataset
from speedyrec.data.parse_cache import load, save
from speedyrec.workflows.speedyfeed import build_sequences
from test_readers import _data_cfg


def _sequences_by_user(train, seqs) -> dict:
    """user index -> (its clicks in order, each click's pool as a tuple of news, or None)."""
    users = np.unique(np.asarray(train.user))  # build_sequences orders sequences by user index
    out = {}
    for k, u in enumerate(users.tolist()):
        a, e = int(seqs.clicks.offsets[k]), int(seqs.clicks.offsets[k + 1])
        pools = [tuple(seqs.pools.row(int(p)).tolist()) if p >= 0 else None for p in seqs.click_pool[a:e]]
        out[u] = (tuple(seqs.clicks.values[a:e].tolist()), tuple(pools))
    return out


@pytest.mark.parametrize("world", [2, 3, 8])
def test_ranks_shares_hold_every_users_sequence_once(tmp_path, synthetic_small, world):
    """The ranks' shares split the users: every impression on exactly one rank, a user's impressions all on one,
    the sequences each rank builds from its share are the user's sequences of the whole log, and the ranks' clicks
    differ by at most the heaviest user's."""
    ds = load_dataset(_data_cfg("data.format=mind", f"data.dir={synthetic_small}", f"data.cache_dir={tmp_path}"))
    train = ds.train
    whole = _sequences_by_user(train, build_sequences(train, len(ds.news)))
    owner = user_owners(train, world)
    seen, clicks = {}, []
    rows = 0
    for rank in range(world):
        share = user_share(train, rank, world, chunk_rows=97)  # chunks that cut users' impressions apart
        rows += len(share)
        assert set(np.unique(share.user).tolist()) == set(np.flatnonzero(owner == rank).tolist())
        np.testing.assert_array_equal(np.diff(share.time) >= 0, True)  # still in time order
        mine = _sequences_by_user(share, build_sequences(share, len(ds.news)))
        assert not set(mine) & set(seen)
        seen.update(mine)
        clicks.append(sum(len(c) for c, _ in mine.values()))
    assert rows == len(train) and seen == whole
    heaviest = max(len(c) for c, _ in whole.values())
    assert max(clicks) - min(clicks) <= heaviest, clicks


def test_a_share_of_a_log_mapped_from_the_cache_equals_one_of_the_log_in_memory(tmp_path, synthetic_small):
    """Read in chunks from the cache's mapped arrays, whose pages are handed back between chunks: the same share."""
    ds = load_dataset(_data_cfg("data.format=mind", f"data.dir={synthetic_small}", f"data.cache_dir={tmp_path}"))
    save(tmp_path / "copy", ds.train, {})
    mapped, _ = load(tmp_path / "copy")
    assert isinstance(mapped.history.values, np.memmap)
    a, b = user_share(ds.train, 1, 3, chunk_rows=50), user_share(mapped, 1, 3, chunk_rows=50)
    for name in ("user", "time", "labels", "unknown_clicks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("history", "candidates"):
        np.testing.assert_array_equal(getattr(a, name).offsets, getattr(b, name).offsets)
        np.testing.assert_array_equal(getattr(a, name).values, getattr(b, name).values)
    assert mapped.history.values.sum() == np.asarray(ds.train.history.values).sum()  # still readable after release
