"""The SpeedyFeed engine: batching loses nothing, centralized encoding and the autoregressive loss equal
slow references, and global dedup over 2 ranks gives the single-process gradient."""

import numpy as np
import pytest
import torch

from speedyrec.engine.batching import DynamicBatcher, SequenceSet, make_units
from speedyrec.engine.cache import DeferredGradients, EmbeddingCache
from speedyrec.engine.distributed import DistInfo, shutdown
from speedyrec.engine.encode import CentralizedEncoder, assign_owners, length_chunks
from speedyrec.engine.loss import autoregressive_loss, click_cross_entropy, inbatch_logits, target_scores
from speedyrec.engine.ragged import Ragged
from speedyrec.models.recommender import UserEncoder

NUM_NEWS = 60


def make_sequences(seed=0, users=25, max_len=70, huge=0) -> SequenceSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, users)
    if huge:
        lengths[0] = huge
    clicks = Ragged.from_lengths(lengths, rng.integers(0, NUM_NEWS, int(lengths.sum())).astype(np.int32))
    pool_len = rng.integers(0, 6, 40)
    pools = Ragged.from_lengths(pool_len, rng.integers(0, NUM_NEWS, int(pool_len.sum())).astype(np.int32))
    click_pool = np.where(rng.random(len(clicks.values)) < 0.6, rng.integers(0, 40, len(clicks.values)), -1)
    return SequenceSet(clicks, click_pool.astype(np.int64), pools, NUM_NEWS)


NEWS_LEN = np.random.default_rng(1).integers(3, 31, NUM_NEWS)


def prepare(news, width):
    return torch.as_tensor(news)


def batcher(seqs, rank=0, world=1, **kw):
    args = dict(token_budget=400, buckets=2, dynamic=True, dedup=True, autoregressive=True, max_history=20,
                negatives=2, batch_size=4, fixed_width=30, seed=3, rank=rank, world=world, prefetch_depth=2)
    args.update(kw)
    return DynamicBatcher(seqs, NEWS_LEN, prepare, **args)


def targets_of(batch):
    """(news id of the target click, its negatives) for every target position of a batch."""
    news = batch.news
    rows = batch.clicks[batch.targets].numpy()
    negs = batch.negatives[batch.targets].numpy()
    return news[rows], news[negs]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("kw", [
    dict(token_budget=1), dict(token_budget=400), dict(token_budget=10**9), dict(buckets=1), dict(buckets=4),
    dict(dynamic=False), dict(dedup=False), dict(autoregressive=False), dict(autoregressive=False, token_budget=1),
    dict(chunk_context=True), dict(chunk_context=True, dynamic=False, token_budget=1),
])
def test_every_click_is_trained_once_per_epoch(world, kw):
    seqs = make_sequences(huge=300)
    trained = []
    units = 0
    for rank in range(world):
        b = batcher(seqs, rank=rank, world=world, **kw)
        for batch in b.epoch(0):
            pos, negs = targets_of(batch)
            trained.append(pos)
            units += batch.counters["sequences_trained"]
            assert (negs != pos[:, None]).all()  # a negative is never the clicked news
            # a unit holds at most max_history targets, and (with context) max_history clicks before them
            assert batch.clicks.shape[1] <= 20 * (2 if kw.get("chunk_context") else 1) + (
                0 if kw.get("autoregressive", True) else 1)
        assert b.sequences_dropped == 0
    assert units == len(make_units(seqs, 20, kw.get("autoregressive", True)).start)
    got = np.sort(np.concatenate(trained))
    assert np.array_equal(got, np.sort(seqs.clicks.values.astype(np.int64)))  # each click exactly once


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kw", [{}, {"autoregressive": False}, {"chunk_context": True},
                                {"dynamic": False, "token_budget": 1}])
def test_impression_targets_train_each_impression_click_once_with_its_impression_negatives(world, kw):
    """targets=impressions: each click made in an impression is a target once per epoch, no history click is,
    every unit formed has a target, and a target's negatives come from its impression while it has enough of
    them (random fills only for the impression's shortfall, where targets=all fills every history click)."""
    seqs = make_sequences(huge=300)
    pool_len = seqs.pools.lengths()
    trained, fills, fills_all, units = [], 0, 0, 0
    for rank in range(world):
        b = batcher(seqs, rank=rank, world=world, targets="impressions", **kw)
        for batch in b.epoch(0):
            assert batch.targets.any(dim=1).all()
            trained.append(targets_of(batch)[0])
            fills += batch.counters["negatives_random"]
            units += batch.counters["sequences_trained"]
        assert b.sequences_dropped == 0
        fills_all += sum(x.counters["negatives_random"] for x in batcher(seqs, rank=rank, world=world, **kw).epoch(0))
    assert units == len(b)
    want = seqs.clicks.values[seqs.click_pool >= 0].astype(np.int64)
    assert b.targets_per_epoch == len(want)
    assert np.array_equal(np.sort(np.concatenate(trained)), np.sort(want))
    # a pool of p news (the click itself at most once among them) leaves at most 2 - (p - 1) random fills
    worst = np.maximum(0, 2 - (pool_len[seqs.click_pool[seqs.click_pool >= 0]] - 1)).sum()
    assert fills <= worst < fills_all


def test_the_same_clicks_get_the_same_negatives_whatever_the_world_size():
    seqs = make_sequences()
    def pairs(world):
        out = []
        for rank in range(world):
            for batch in batcher(seqs, rank=rank, world=world).epoch(1):
                pos, negs = targets_of(batch)
                out += [(int(p), tuple(n)) for p, n in zip(pos, negs)]
        return sorted(out)
    assert pairs(1) == pairs(3)


def test_budget_is_respected_unless_a_unit_alone_exceeds_it():
    seqs = make_sequences(huge=400)
    for batch in batcher(seqs, token_budget=300).epoch(0):
        cost = len(batch.news) * batch.width
        assert cost <= 300 or batch.counters["sequences_trained"] == 1


def test_negatives_come_from_the_impression_first():
    from speedyrec.engine.negatives import sample_negatives

    pools = Ragged.from_lists([[5, 6, 7], [8], [], [4, 9]])
    negs, fills = sample_negatives(pools, 2, np.array([1, 2, 3, 4]), NUM_NEWS, seed=0, row_keys=np.arange(4))
    assert set(negs[0]) <= {5, 6, 7} and len(set(negs[0])) == 2  # without replacement
    assert negs[1, 0] == 8 and negs[1, 1] != 2  # the pool, then a random news other than the click
    assert negs[3, 0] == 9 and negs[3, 1] != 4  # the clicked news in its own pool is skipped
    assert fills.tolist() == [0, 1, 2, 1]  # random fills per row


def test_length_chunks_cover_everything_in_order():
    lengths = np.sort(np.random.default_rng(0).integers(1, 50, 200))
    chunks = length_chunks(lengths, 300)
    assert np.array_equal(np.concatenate(chunks), np.arange(200))
    for c in chunks:
        assert len(c) == 1 or len(c) * lengths[c].max() <= 300


def test_owner_assignment_picks_one_holder_per_id():
    a, b, c = np.array([1, 2, 3, 9]), np.array([2, 3, 4]), np.array([3, 9])
    owners = assign_owners([a, b, c], seed=0, step=5)
    holders = {}
    for r, (ids, own) in enumerate(zip([a, b, c], owners)):
        for i, o in zip(ids, own):
            holders.setdefault(int(i), set()).add(int(o))
            assert o in {rr for rr, arr in enumerate([a, b, c]) if i in arr}
    assert all(len(v) == 1 for v in holders.values())  # all ranks agree on one owner per id


# ---------------------------------------------------------------------------------------------------
class BagEncoder(torch.nn.Module):
    """A deterministic stand-in news encoder: mean of learned token vectors."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, dim)

    def forward(self, ids, mask):
        e = self.emb(ids) * mask[..., None]
        return e.sum(1) / mask.sum(1, keepdim=True)


def token_table(news):
    """Tokens of news n: n % 7 + 1 tokens with ids derived from n."""
    lengths = news % 7 + 1
    width = int(lengths.max(initial=1))
    ids = (news[:, None] * 3 + np.arange(width)[None, :]) % 100
    mask = np.arange(width)[None, :] < lengths[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask), lengths


def make_encode_rows(model):
    def encode_rows(tokens, rows):
        ids, mask = tokens
        r = torch.from_numpy(rows)
        m = mask[r]
        return model(ids[r], m), int(m.sum()), m.numel() - int(m.sum())
    return encode_rows


def pooled_state(model, user, hist: list[int]) -> torch.Tensor:
    """The user state after the clicks ``hist``, each news encoded on its own (the empty state for none)."""
    if not hist:
        return user.empty
    ids, mask, _ = token_table(np.array(hist))
    return user(model(ids, mask)[None], torch.ones(1, len(hist), dtype=torch.bool))[0]


def state_before(model, user, seqs, idx, t) -> torch.Tensor:
    """The state that scores position t of a unit (sequence positions ``idx``): pooled over the clicks before it
    that belong to another impression."""
    p = seqs.click_pool[idx[t]]
    return pooled_state(model, user, [int(seqs.clicks.values[idx[j]]) for j in range(t)
                                      if p < 0 or seqs.click_pool[idx[j]] != p])


def reference_loss(model, user, news_of_clicks, news_of_negs, targets):
    """Slow and obvious: encode every position separately, and pool every prefix separately."""
    total = 0.0
    for b in range(news_of_clicks.shape[0]):
        for t in range(news_of_clicks.shape[1]):
            if not targets[b, t]:
                continue
            u = pooled_state(model, user, [int(n) for n in news_of_clicks[b, :t] if n >= 0])
            cand = np.concatenate([[news_of_clicks[b, t]], news_of_negs[b, t]])
            ids, mask, _ = token_table(cand)
            scores = model(ids, mask) @ u
            total = total + torch.logsumexp(scores, 0) - scores[0]
    return total


@pytest.mark.parametrize("dedup", [True, False])
def test_centralized_encoding_and_autoregressive_loss_equal_the_slow_reference(dedup):
    seqs = make_sequences(users=6, max_len=9)
    batch = next(iter(batcher(seqs, token_budget=10**9, dedup=dedup, max_history=8).epoch(0)))
    model, user = BagEncoder(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(batch.news)
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=None, global_dedup=False, chunk_tokens=13)
    table = enc(batch.news, lengths, (ids, mask), step=0).table
    loss, n = autoregressive_loss(table, batch.clicks, batch.negatives, batch.targets, user.prefix_states, user.empty)
    news = batch.news
    clicks = np.where(batch.clicks.numpy() >= 0, news[np.maximum(batch.clicks.numpy(), 0)], -1)
    negs = news[np.maximum(batch.negatives.numpy(), 0)]
    ref = reference_loss(model, user, clicks, negs, batch.targets.numpy())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert n == int(batch.targets.sum())
    g = torch.autograd.grad(loss, list(model.parameters()) + list(user.parameters()))
    g_ref = torch.autograd.grad(ref, list(model.parameters()) + list(user.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fully_cached_batch_still_trains_the_user_side():
    seqs = make_sequences(users=4, max_len=6)
    batch = next(iter(batcher(seqs, token_budget=10**9).epoch(0)))
    model, user = BagEncoder(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(batch.news)
    cache = EmbeddingCache(NUM_NEWS, 8, gamma=5, beta=1e9, seed=0, dist=DistInfo(), device=torch.device("cpu"))
    cache.write(np.arange(NUM_NEWS), torch.randn(NUM_NEWS, 8), 3)
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=cache, global_dedup=False, chunk_tokens=100)
    out = enc(batch.news, lengths, (ids, mask), step=4)
    assert out.counters["cache_hits"] == len(batch.news) and out.counters["news_encoded"] == 0
    loss, n = autoregressive_loss(out.table, batch.clicks, batch.negatives, batch.targets, user.prefix_states, user.empty)
    loss.backward()
    assert n > 0 and user.pool.query.grad is not None and model.emb.weight.grad is None


def test_deferred_gradients_of_cache_hits_reach_the_encoder_at_the_next_fresh_encoding():
    """Step 1 serves every row from the cache (no encoder gradient); step 2 encodes them afresh (expired) and its
    encoder gradient is its own loss's plus the step-1 gradients of the served rows, pulled back through the fresh
    encoding: the reference computes both by hand. The loss value is unchanged and nothing is applied twice."""
    seqs = make_sequences(users=4, max_len=6)
    batch = next(iter(batcher(seqs, token_budget=10**9).epoch(0)))
    model, user = BagEncoder(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(batch.news)
    params = list(model.parameters())
    cache = EmbeddingCache(NUM_NEWS, 8, gamma=1, beta=1e9, seed=0, dist=DistInfo(), device=torch.device("cpu"))
    deferred = DeferredGradients(NUM_NEWS, 8, torch.device("cpu"))
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=cache, global_dedup=False, chunk_tokens=100,
                             deferred=deferred)

    def loss_of(table):
        return autoregressive_loss(table, batch.clicks, batch.negatives, batch.targets, user.prefix_states, user.empty)[0]

    out0 = enc(batch.news, lengths, (ids, mask), step=0)  # p_0 = 0: everything encoded, and written
    assert out0.counters["cache_hits"] == 0 and out0.deferred is None and not deferred.pending.any()
    out1 = enc(batch.news, lengths, (ids, mask), step=1)  # everything served
    assert out1.counters["cache_hits"] == len(batch.news) and out1.deferred is None
    loss_of(out1.table).backward()
    assert all(p.grad is None for p in params)  # served rows are constants to the encoder
    served = out0.table.detach().clone().requires_grad_(True)  # the same vectors, as the reference's leaf
    g1 = torch.autograd.grad(loss_of(served), served)[0]
    assert deferred.pending[batch.news].all() and not deferred.pending[np.setdiff1d(np.arange(NUM_NEWS), batch.news)].any()
    torch.testing.assert_close(deferred.grad[torch.from_numpy(batch.news)], g1)

    out2 = enc(batch.news, lengths, (ids, mask), step=2)  # expired (age 2 > gamma): encoded afresh
    assert out2.counters["news_encoded"] == len(batch.news) and out2.counters["deferred_grad_rows"] == len(batch.news)
    total = loss_of(out2.table) + (out2.deferred - out2.deferred.detach())
    torch.testing.assert_close(total, loss_of(out2.table))  # the value is the step's own loss
    got = torch.autograd.grad(total, params)
    fresh = model(ids, mask)
    want = torch.autograd.grad(loss_of(fresh) + (fresh * g1).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not deferred.pending.any() and deferred.grad.abs().sum() == 0  # handed over once, then cleared
    state = DeferredGradients(NUM_NEWS, 8, torch.device("cpu"))
    deferred.add(batch.news[:2], torch.ones(2, 8))
    state.load_state_dict(deferred.state_dict())  # a resumed run holds the same pending gradients
    assert state.pending.tolist() == deferred.pending.tolist() and torch.equal(state.grad, deferred.grad)


# ---------------------------------------------------------------------------------------------------
def _global_dedup_worker(rank, world, init_file, batches, out_dir, global_dedup):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    model, user = BagEncoder(), UserEncoder(8, 4)  # seeded: the same parameters as the parent's
    enc = CentralizedEncoder(make_encode_rows(model), 8, info, cache=None, global_dedup=global_dedup, chunk_tokens=50)
    news, clicks, negs, targets, global_targets = batches[rank]
    ids, mask, lengths = token_table(news)
    out = enc(news, lengths, (ids, mask), step=0)
    loss, _ = autoregressive_loss(out.table, clicks, negs, targets, user.prefix_states, user.empty)
    (loss / global_targets).backward()
    from speedyrec.engine.distributed import reduce_gradients

    reduce_gradients(list(model.parameters()) + list(user.parameters()), 1.0)
    total = torch.tensor([out.counters["news_encoded"]])
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"enc": model.emb.weight.grad, "encoded": int(total)}, out_dir)
    shutdown()  # a barrier first: no rank exits while a gloo thread still holds its last collective


@pytest.mark.parametrize("global_dedup", [True, False])
def test_two_ranks_global_dedup_match_one_rank(tmp_path, global_dedup):
    """The same global batch, split over 2 gloo ranks, gives the single-process encoder gradient; with global
    dedup every distinct news is encoded by exactly one rank."""
    import torch.multiprocessing as mp

    seqs = make_sequences(users=8, max_len=12)
    full = next(iter(batcher(seqs, token_budget=10**9, max_history=12).epoch(0)))
    n_targets = int(full.targets.sum())
    # one process, whole batch
    model, user = BagEncoder(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(full.news)
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=None, global_dedup=False, chunk_tokens=50)
    loss, _ = autoregressive_loss(enc(full.news, lengths, (ids, mask), 0).table, full.clicks, full.negatives,
                                  full.targets, user.prefix_states, user.empty)
    (loss / n_targets).backward()
    # the same sequences split in two halves, each re-indexed to its own distinct news
    halves = []
    for part in (slice(0, 4), slice(4, None)):
        c, ng, t = full.clicks[part], full.negatives[part], full.targets[part]
        used = np.unique(np.concatenate([c[c >= 0].numpy(), ng[ng >= 0].numpy()]))
        remap = -np.ones(len(full.news), dtype=np.int64)
        remap[used] = np.arange(len(used))
        halves.append((full.news[used], torch.from_numpy(np.where(c >= 0, remap[c.clamp(min=0)], -1)),
                       torch.from_numpy(np.where(ng >= 0, remap[ng.clamp(min=0)], -1)), t, n_targets))
    out = tmp_path / "grad.pt"
    mp.spawn(_global_dedup_worker, args=(2, str(tmp_path / "init"), halves, str(out), global_dedup), nprocs=2)
    got = torch.load(out)
    torch.testing.assert_close(got["enc"], model.emb.weight.grad, rtol=1e-5, atol=1e-6)
    overlap = len(np.intersect1d(halves[0][0], halves[1][0]))
    if global_dedup:
        assert got["encoded"] == len(full.news)  # each distinct news of the global batch encoded once
    else:
        assert got["encoded"] == len(full.news) + overlap


# ---------------------------------------------------------------------------------------------------
def impression_sequences(seed=0, users=6) -> SequenceSet:
    """The layout of real logs: each user's history clicks (no impression), then impressions whose 1-3 clicks
    are adjacent (build_sequences orders them by candidate position)."""
    rng = np.random.default_rng(seed)
    clicks, pools, lengths, imp = [], [], [], 0
    for _ in range(users):
        n = 0
        for _ in range(int(rng.integers(0, 6))):
            clicks.append(int(rng.integers(0, NUM_NEWS)))
            pools.append(-1)
            n += 1
        for _ in range(int(rng.integers(1, 7))):
            for _ in range(int(rng.integers(1, 4))):
                clicks.append(int(rng.integers(0, NUM_NEWS)))
                pools.append(imp % 40)
                n += 1
            imp += 1
        lengths.append(n)
    pool_len = rng.integers(0, 6, 40)
    pool_news = Ragged.from_lengths(pool_len, rng.integers(0, NUM_NEWS, int(pool_len.sum())).astype(np.int32))
    return SequenceSet(Ragged.from_lengths(np.array(lengths), np.array(clicks, dtype=np.int32)),
                       np.array(pools, dtype=np.int64), pool_news, NUM_NEWS)


def test_impression_run_starts_by_a_loop():
    from speedyrec.engine.batching import impression_run_starts

    pools = np.array([-1, -1, 4, 4, 4, 7, 7, -1, 3, 3, 3, 2])
    pos = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])  # two units; the second starts inside impression 3's run
    want = []
    for i in range(len(pools)):
        j = i
        while pos[j] > 0 and pools[i] >= 0 and pools[j - 1] == pools[i]:
            j -= 1
        want.append(pos[j])
    assert impression_run_starts(pools, pos).tolist() == want == [0, 1, 2, 2, 2, 5, 5, 7, 0, 0, 0, 3]


@pytest.mark.parametrize("targets", ["all", "impressions"])
@pytest.mark.parametrize("chunk_context", [False, True])
def test_a_click_never_sees_its_own_impression_and_context_is_not_trained(chunk_context, targets):
    """Slow reference: every target is scored from a user state pooled, one by one, over the clicks before it
    in its unit that belong to another impression; context positions are never targets. With
    targets=impressions the history clicks are context as well: only impression clicks are targets, each once."""
    seqs = impression_sequences()
    b = batcher(seqs, token_budget=10**9, buckets=1, max_history=4, chunk_context=chunk_context, targets=targets)
    batch = next(iter(b.epoch(0)))
    assert batch.counters["sequences_trained"] == len(b)
    model, user = BagEncoder(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(batch.news)
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=None, global_dedup=False, chunk_tokens=13)
    table = enc(batch.news, lengths, (ids, mask), step=0).table
    loss, n = autoregressive_loss(table, batch.clicks, batch.negatives, batch.targets, user.prefix_states, user.empty,
                                  batch.state_pos)
    news = batch.news
    ref, n_ref, seen = 0.0, 0, []
    starts = seqs.clicks.offsets[:-1]
    for row, unit in enumerate(batch.units):
        lo = int(b.units.start[unit])
        idx = np.arange(lo, lo + int(b.units.length[unit]))
        first_target = int(b.units.targets_from[unit])
        seq = int(np.searchsorted(starts, lo, side="right") - 1)
        # context: up to max_history clicks before the chunk's first target, when asked; none otherwise
        assert first_target == (min(4, idx[0] + first_target - starts[seq]) if chunk_context else 0)
        may_train = seqs.click_pool[idx] >= 0 if targets == "impressions" else np.ones(len(idx), dtype=bool)
        assert may_train[first_target:].any()  # a unit without a target is not formed
        for t in range(len(idx)):
            assert bool(batch.targets[row, t]) == (t >= first_target and may_train[t])
            if not batch.targets[row, t]:
                continue
            seen.append(int(idx[t]))
            u = state_before(model, user, seqs, idx, t)
            cand = np.concatenate([[seqs.clicks.values[idx[t]]], news[batch.negatives[row, t].numpy()]])
            cids, cmask, _ = token_table(cand)
            scores = model(cids, cmask) @ u
            ref = ref + torch.logsumexp(scores, 0) - scores[0]
            n_ref += 1
    trainable = np.flatnonzero(seqs.click_pool >= 0) if targets == "impressions" else np.arange(len(seqs.clicks.values))
    assert sorted(seen) == trainable.tolist()  # every click that may train is a target exactly once
    assert n == n_ref == b.targets_per_epoch
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_inbatch_negatives_equal_a_per_target_reference_and_never_score_the_users_own_clicks():
    """Slow reference: each target's click against every news of the batch that its unit does not click (context
    included), each news encoded on its own, the user state pooled over the clicks before it of other impressions."""
    seqs = impression_sequences(users=8)
    b = batcher(seqs, token_budget=10**9, buckets=1, max_history=4)
    batch = next(iter(b.epoch(0)))
    model, user = BagEncoder(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(batch.news)
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=None, global_dedup=False, chunk_tokens=13)
    table = enc(batch.news, lengths, (ids, mask), step=0).table
    scores = target_scores(table, batch.clicks, batch.negatives, batch.targets, user.prefix_states, user.empty,
                           batch.state_pos)
    logits = inbatch_logits(table, batch.clicks, batch.targets, scores)
    loss, n = click_cross_entropy(logits).sum(), int(batch.targets.sum())
    news = batch.news
    assert len(np.unique(news)) == len(news)  # a deduplicated table: one row per news
    ref, counts = 0.0, []
    for row, unit in enumerate(batch.units):
        lo = int(b.units.start[unit])
        idx = np.arange(lo, lo + int(b.units.length[unit]))
        own = set(seqs.clicks.values[idx].tolist())
        others = np.array([x for x in news if x not in own])
        for t in range(len(idx)):
            if not batch.targets[row, t]:
                continue
            u = state_before(model, user, seqs, idx, t)
            cids, cmask, _ = token_table(np.concatenate([[seqs.clicks.values[idx[t]]], others]))
            sc = model(cids, cmask) @ u
            ref = ref + torch.logsumexp(sc, 0) - sc[0]
            counts.append(len(others))
    assert n == len(counts) and logits.shape == (n, 1 + len(news))
    assert torch.isfinite(logits[:, 1:]).sum(1).tolist() == counts  # exactly the news the unit never clicks
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    params = list(model.parameters()) + list(user.parameters())
    for a, c in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    # a target's sampled negatives are among its in-batch ones unless its user clicked them too (masked then): where
    # none was, the larger candidate set can only raise the target's loss
    rows, cols = batch.targets.nonzero(as_tuple=True)
    kept = torch.tensor([not set(batch.negatives[r, c].tolist()) & set(batch.clicks[r].tolist()) for r, c in zip(rows, cols)])
    assert 0 < int(kept.sum()) < n  # both kinds occur in this batch
    assert (click_cross_entropy(logits)[kept] >= click_cross_entropy(scores.logits)[kept] - 1e-5).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU path's mixed precision: float32 logits, close loss
        table16 = enc(batch.news, lengths, (ids, mask), step=0).table
        s16 = target_scores(table16, batch.clicks, batch.negatives, batch.targets, user.prefix_states, user.empty,
                            batch.state_pos)
        loss16 = click_cross_entropy(inbatch_logits(table16, batch.clicks, batch.targets, s16)).sum()
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    torch.testing.assert_close(loss16, loss.detach(), rtol=0.03, atol=0.0)


def test_width_groups_pad_the_least_a_brute_force_finds():
    import itertools

    from speedyrec.engine.encode import width_groups

    rng = np.random.default_rng(0)
    pad = lambda lengths, groups: sum(len(g) * lengths[g].max() - lengths[g].sum() for g in groups)
    for _ in range(200):
        n, k = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        lengths = np.sort(rng.integers(1, 12, n))
        groups = width_groups(lengths, k)
        assert len(groups) <= k and np.array_equal(np.concatenate(groups), np.arange(n))
        best = min(pad(lengths, [np.arange(a, b) for a, b in zip((0, *cuts), (*cuts, n))])
                   for r in range(min(k, n)) for cuts in itertools.combinations(range(1, n), r))
        assert pad(lengths, groups) == best
    assert width_groups(np.zeros(0, dtype=np.int64), 3) == []


# -- the training loop's clock: periodic work by training seconds, early stop ---------------------------------
def test_periodic_by_training_seconds_and_stop(monkeypatch):
    """A fake clock advances 1 s per step; evaluation 'takes' 100 s and must not count as training."""
    import speedyrec.engine.trainer as trainer_mod
    from speedyrec.engine.trainer import StepOutput, Trainer

    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock["t"])
    w = torch.nn.Parameter(torch.ones(()))
    calls = []

    def periodic(step):
        calls.append((step, trainer.train_seconds()))
        clock["t"] += 100.0  # evaluation time
        if len(calls) == 3:
            trainer.stop()
        return 100.0

    def step_fn(batch):
        clock["t"] += 1.0  # one second of training per step
        return StepOutput((w * 2.0).sum(), 1, {"clicks_trained": 1})

    trainer = Trainer(torch.nn.Linear(1, 1), torch.optim.SGD([w], lr=0.1), DistInfo(), periodic=periodic,
                      periodic_seconds=2.5, log_every=0)
    trainer.params = [w]
    trainer.fit(1, lambda epoch, skip: iter(range(100)), step_fn)
    # due once 2.5, 5.0, 7.5 training seconds have passed: after steps 3, 5 and 8
    assert [s for s, _ in calls] == [3, 5, 8]
    assert [round(t) for _, t in calls] == [3, 5, 8]
    assert trainer.state.step == 8  # stopped right after the third evaluation
    assert trainer.state.wall_seconds == pytest.approx(8.0)  # 300 s of evaluation excluded


# ---------------------------------------------------------------------------------------------------
class ProjectedBag(BagEncoder):
    """BagEncoder and a linear layer: under bf16 autocast its output is bf16, as a transformer's is."""

    def __init__(self, dim=8):
        super().__init__(dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, ids, mask):
        return self.proj(super().forward(ids, mask))


def _uneven_bf16_worker(rank, world, init_file, batch, out_dir):
    import torch.distributed as dist

    from speedyrec.engine.distributed import reduce_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    model, user = ProjectedBag(), UserEncoder(8, 4)
    enc = CentralizedEncoder(make_encode_rows(model), 8, info, cache=None, global_dedup=True, chunk_tokens=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if rank == 0:
            news, clicks, negs, targets = batch
            ids, mask, lengths = token_table(news)
            out = enc(news, lengths, (ids, mask), step=0)
            loss, _ = autoregressive_loss(out.table, clicks, negs, targets, user.prefix_states, user.empty)
        else:  # the epoch tail of an uneven shard: this rank has no batch and encodes nothing
            empty = np.zeros(0, dtype=np.int64)
            out = enc(empty, empty, None, step=0)
            loss = out.table.sum() * 0.0
    loss.float().backward()
    reduce_gradients(list(model.parameters()) + list(user.parameters()), 1.0)
    if rank == 0:
        torch.save({"proj": model.proj.weight.grad, "emb": model.emb.weight.grad}, out_dir)
    shutdown()  # a barrier first: no rank exits while a gloo thread still holds its last collective


def test_two_ranks_bf16_global_dedup_with_a_rank_that_has_no_batch(tmp_path):
    """With bf16 autocast a rank that encodes nothing must still gather in the same dtype as the others
    (gloo aborts on a size mismatch, NCCL would hang); its gradients are the one-process ones."""
    import torch.multiprocessing as mp

    seqs = make_sequences(users=6, max_len=10)
    b = next(iter(batcher(seqs, token_budget=10**9, max_history=10).epoch(0)))
    model, user = ProjectedBag(), UserEncoder(8, 4)
    ids, mask, lengths = token_table(b.news)
    enc = CentralizedEncoder(make_encode_rows(model), 8, DistInfo(), cache=None, global_dedup=False, chunk_tokens=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        table = enc(b.news, lengths, (ids, mask), 0).table
        assert table.dtype == torch.bfloat16  # the case that broke: one rank bf16, the other float32
        loss, _ = autoregressive_loss(table, b.clicks, b.negatives, b.targets, user.prefix_states, user.empty)
    loss.float().backward()
    out = tmp_path / "grad.pt"
    mp.spawn(_uneven_bf16_worker, args=(2, str(tmp_path / "init"), (b.news, b.clicks, b.negatives, b.targets), str(out)),
             nprocs=2)
    got = torch.load(out)
    torch.testing.assert_close(got["proj"], model.proj.weight.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got["emb"], model.emb.weight.grad, rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
class TinyRecommender(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.news, self.user = ProjectedBag(), UserEncoder(8, 4)


def _step_fn(model, device):
    from speedyrec.engine.trainer import StepOutput

    def step(batch):
        if batch is None:
            return StepOutput(None, 0, {})
        ids, mask, _ = token_table(batch.news)
        table = model.news(ids, mask)
        loss, n = autoregressive_loss(table, batch.clicks, batch.negatives, batch.targets, model.user.prefix_states,
                                      model.user.empty)
        return StepOutput(loss, n, {})
    return step


def _ddp_worker(rank, world, init_file, shards, out_path, grad_accum):
    import torch.distributed as dist

    from speedyrec.engine.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = TinyRecommender()
    grads = []
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), DistInfo(rank, world, rank, torch.device("cpu")),
                      grad_accum=grad_accum, log_every=0,
                      grad_hook=lambda: grads.append([p.grad.clone() for p in model.parameters()]))
    assert trainer.ddp is not None  # the step runs inside DistributedDataParallel
    trainer.fit(1, lambda epoch, skip: iter(shards[rank][skip:]), _step_fn(model, torch.device("cpu")))
    if rank == 0:
        torch.save(grads, out_path)
    del trainer  # DDP's reducer goes before its process group, as in speedyrec.train
    shutdown()  # a barrier first: no rank exits while a gloo thread still holds its last collective


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_gradients_equal_the_single_process_gradients_of_the_same_global_batch(tmp_path, grad_accum):
    """Uneven shards (3 micro-batches on rank 0, 1 on rank 1, of different sizes): each optimizer step's reduced
    gradient equals the one-process gradient of the same global window: every target weighs the same."""
    import torch.multiprocessing as mp

    seqs = make_sequences(users=12, max_len=9)
    batches = list(batcher(seqs, token_budget=120, max_history=8).epoch(0))
    assert len(batches) >= 4
    shards = [batches[:3], batches[3:4]]
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), shards, str(out), grad_accum), nprocs=2)
    got = torch.load(out)
    # the reference: the windows of the global batch, in one process
    windows = ([[shards[0][0], shards[1][0]], [shards[0][1]], [shards[0][2]]] if grad_accum == 1 else
               [[shards[0][0], shards[1][0], shards[0][1]], [shards[0][2]]])
    assert len(got) == len(windows)
    model = TinyRecommender()
    step = _step_fn(model, torch.device("cpu"))
    for window, grads in zip(windows, got):
        model.zero_grad()
        outs = [step(b) for b in window]
        (sum(o.loss_sum for o in outs) / sum(o.targets for o in outs)).backward()
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(g, p.grad if p.grad is not None else torch.zeros_like(p), rtol=1e-5, atol=1e-6)


def test_linear_learning_rate_decay_follows_the_targets_trained_and_resumes_exactly():
    """train.lr_schedule=linear: after every step the rate is base x (1 - targets seen / targets planned),
    reaching zero when the plan is done; restoring a checkpoint restores the rate with the step."""
    from speedyrec.engine.trainer import Trainer, checkpoint_state, restore_state

    seqs = make_sequences(users=12, max_len=9)
    batches = list(batcher(seqs, token_budget=120, max_history=8).epoch(0))
    total = float(sum(b.num_targets for b in batches))
    model = TinyRecommender()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen, rates = [], []
    trainer = Trainer(model, opt, DistInfo(), log_every=0, progress_total=total, lr_schedule="linear",
                      after_step=lambda step: (seen.append(trainer.state.targets_seen),
                                               rates.append(opt.param_groups[0]["lr"])))
    assert opt.param_groups[0]["lr"] == 0.5
    trainer.fit(1, lambda epoch, skip: iter(batches[skip:]), _step_fn(model, torch.device("cpu")))
    assert len(rates) == len(batches) and rates[-1] == 0.0
    for s, r in zip(seen, rates):
        assert r == pytest.approx(0.5 * (1 - s / total))
    shared, own = checkpoint_state(trainer)
    own["targets_seen"], own["step"] = seen[1], 2  # as if saved after the second step
    fresh = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), DistInfo(), log_every=0,
                    progress_total=total, lr_schedule="linear")
    restore_state(fresh, {**shared, "optimizer": fresh.optimizer.state_dict()}, own)
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(rates[1])
    with pytest.raises(ValueError, match="run's length"):
        Trainer(model, opt, DistInfo(), lr_schedule="linear")


@pytest.mark.parametrize("piece", [1, 3, 7, 1 << 22])
def test_ragged_take_in_pieces_equals_the_take_of_every_row(monkeypatch, piece):
    """Ragged.take gathers in pieces of TAKE_PIECE values (bounded positions, however large the take): the rows
    asked for, in their order, repeats, empty rows and rows longer than a piece included."""
    from speedyrec.engine import ragged

    monkeypatch.setattr(ragged, "TAKE_PIECE", piece)
    rng = np.random.default_rng(0)
    r = ragged.Ragged.from_lengths(np.array([0, 5, 1, 0, 12, 3, 2]), rng.integers(0, 100, 23).astype(np.int32))
    for rows in ([], [4], [6, 4, 4, 0, 1, 3, 2, 5], rng.integers(0, 7, 40).tolist()):
        got = r.take(np.asarray(rows, dtype=np.int64))
        want = [r.row(i).tolist() for i in rows]
        assert [got.row(i).tolist() for i in range(len(rows))] == want
        assert got.values.dtype == np.int32 and got.offsets.dtype == np.int64 and len(got) == len(rows)
