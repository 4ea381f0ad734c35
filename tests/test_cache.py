"""The global embedding cache: freshness, the lookup schedule, and what a hit serves."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speedyrec.engine.cache import EmbeddingCache
from speedyrec.engine.distributed import DistInfo, shutdown


def _cache(n=50, dim=4, gamma=3, beta=1e9, seed=0):
    return EmbeddingCache(n, dim, gamma=gamma, beta=beta, seed=seed, dist=DistInfo(), device=torch.device("cpu"))


@settings(max_examples=60, deadline=None)
@given(gamma=st.integers(0, 6), beta=st.sampled_from([0.0, 0.05, 1.0, 1e9]),
       schedule=st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 29), min_size=0, max_size=12)),
                         min_size=1, max_size=40))
def test_never_serves_an_entry_older_than_gamma(gamma, beta, schedule):
    """Random schedules of steps (advancing 0-2 at a time) that look up and then write random ids."""
    cache = _cache(n=30, gamma=gamma, beta=beta)
    written: dict[int, tuple[int, torch.Tensor]] = {}
    step = 0
    for advance, ids in schedule:
        step += advance
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        look = cache.lookup(ids, step)
        served = ids[look.hit]
        assert len(look.emb) == len(served) == len(look.ages)
        for i, e, age in zip(served, look.emb, look.ages):
            stamp, value = written[int(i)]
            assert step - stamp <= gamma  # freshness: computed at most gamma steps ago
            assert torch.equal(e, value)  # the latest write of that news
            assert age == step - stamp  # the age the row reports is the ledger's
        if beta == 0.0:
            assert not look.hit.any()  # p_0 = 0 and p_t = 0 for beta = 0
        if beta >= 1e9 and step > 0:  # p_t = 1: every fresh entry is read
            fresh = [i for i in ids if int(i) in written and step - written[int(i)][0] <= gamma]
            assert sorted(served.tolist()) == sorted(int(i) for i in fresh)
        misses = ids[~look.hit]
        values = torch.randn(len(misses), 4)
        cache.write(misses, values, step)
        for i, v in zip(misses, values):
            written[int(i)] = (step, v)


def test_gamma_zero_never_hits_across_steps():
    cache = _cache(gamma=0)
    cache.write(np.arange(10), torch.randn(10, 4), 5)
    assert not cache.lookup(np.arange(10), 6).hit.any()
    assert cache.lookup(np.arange(10), 5).hit.all()  # same step (accumulation micro-batches): same parameters


def test_lookup_rate_follows_the_schedule():
    cache = _cache(n=20000, gamma=10**9, beta=2e-3)
    ids = np.arange(20000)
    cache.write(ids, torch.zeros(20000, 4), 0)
    for step in (0, 100, 500, 2000):
        rate = cache.lookup(ids, step).hit.mean()
        p = 1 - np.exp(-2e-3 * step)
        assert abs(rate - p) < 0.02, (step, rate, p)


def test_decisions_are_a_function_of_news_and_step():
    """Two ranks asking about the same news at the same step decide alike (no shared RNG state)."""
    a, b = _cache(n=100, gamma=100, beta=5e-3), _cache(n=100, gamma=100, beta=5e-3)
    for c in (a, b):
        c.write(np.arange(100), torch.zeros(100, 4), 0)
    ids = np.arange(100)
    assert (a.lookup(ids, 50).hit == b.lookup(ids[::-1], 50).hit[::-1]).all()
    assert (a.lookup(ids, 50).hit == a.lookup(ids, 50).hit).all()


def test_hits_are_detached():
    cache = _cache()
    emb = torch.randn(3, 4, requires_grad=True)
    cache.write(np.array([1, 2, 3]), emb * 2, 0)
    look = cache.lookup(np.array([1, 2, 3]), 1)
    assert look.hit.all() and not look.emb.requires_grad


def _sharded_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    kw = dict(gamma=3, beta=0.3, seed=7, dist=info, device=torch.device("cpu"))
    sharded = EmbeddingCache(40, 4, max_bytes=1, **kw)  # a replica would not fit: rows live on their owners
    replicated = EmbeddingCache(40, 4, **kw)
    assert sharded.sharded and not replicated.sharded
    assert sharded.emb.shape[0] == 20  # each rank holds half the rows
    # the decision is the ranks' together: a replica that fits on rank 0 but not on rank 1 is sharded on both
    assert EmbeddingCache(40, 4, max_bytes=1 if rank == 1 else 1 << 30, **kw).sharded
    rng = np.random.default_rng(100 + rank)
    log = []
    for step in range(12):
        ids = np.unique(rng.integers(0, 40, rng.integers(0, 15)))
        a, b = sharded.lookup(ids, step), replicated.lookup(ids, step)
        assert (a.hit == b.hit).all() and torch.equal(a.emb, b.emb) and np.array_equal(a.ages, b.ages)
        log.append(int(a.hit.sum()))
        misses = ids[~a.hit]
        values = torch.from_numpy(rng.standard_normal((len(misses), 4)).astype(np.float32))
        sharded.write(misses, values, step)
        replicated.write(misses, values, step)
    torch.save(log, f"{out_file}.{rank}")
    shutdown()  # a barrier first: no rank exits while a gloo thread still holds its last collective


def test_sharded_cache_serves_what_a_replicated_one_serves(tmp_path):
    """Two gloo ranks with different ids per step: the sharded cache (rows on their owner rank, collective
    lookups) returns exactly the replicated cache's hits and rows; ranks whose memory budgets differ agree to
    shard."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "hits")), nprocs=2)
    hits = [torch.load(f"{tmp_path / 'hits'}.{r}") for r in range(2)]
    assert sum(map(sum, hits)) > 0  # the schedule did serve rows from the cache


def test_served_ages_come_from_the_rows_and_catch_a_stamp_that_lies():
    """The freshness rule reads ``stamp``; the reported age reads the row. A bug that refreshes a stamp without
    writing the row (simulated here) serves an old vector: the rule is fooled, the age is not."""
    cache = _cache(gamma=3)
    cache.write(np.arange(5), torch.randn(5, 4), 2)
    look = cache.lookup(np.arange(5), 4)
    assert look.hit.all() and look.ages.tolist() == [2.0] * 5
    cache.stamp[np.arange(5)] = 9  # the lie: "written at step 9"
    look = cache.lookup(np.arange(5), 10)
    assert look.hit.all()  # the rule believes it
    assert (look.ages == 8).all() and look.ages.max() > cache.gamma  # the rows say otherwise
    cache.stamp[7] = 10  # a row never written, claimed fresh
    assert cache.lookup(np.array([7]), 10).ages[0] > 1e8


def test_a_news_several_ranks_encoded_is_written_once_from_the_lowest_rank():
    """A replicated cache applies every rank's writes; without global dedup two ranks may both encode a news (with
    different dropout). The write keeps the lowest rank's row: an index write with repeated indices has no defined
    winner on CUDA, so replicas would drift apart (on a CPU the last would win)."""
    cache = _cache(n=10)
    first, second = torch.full((1, 4), 1.0), torch.full((1, 4), 2.0)
    ids = np.array([3, 5, 3])  # as gathered in rank order: rank 0 wrote 3 and 5, rank 1 wrote 3 again
    cache.write(ids, torch.cat([first, torch.zeros(1, 4), second]), 4, everyone_has_all=True)
    look = cache.lookup(np.array([3]), 5)
    assert look.hit.all() and torch.equal(look.emb, first)


def test_the_age_column_is_written_by_the_clock_it_is_given():
    """Ages are measured with the optimizer's clock (``now``), the hit decision with the stamps (``step``)."""
    cache = _cache(gamma=3)
    cache.write(np.arange(4), torch.randn(4, 4), 2, now=7)
    look = cache.lookup(np.arange(4), 4, now=9)
    assert look.hit.all() and look.ages.tolist() == [2.0] * 4 and look.stamp_ages.tolist() == [2] * 4
