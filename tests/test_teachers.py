"""Teachers as components: the shared frozen prefix changes nothing but the cost, the teacher bank returns what
the teacher computes online, and a teacher that does not hold its saved weights is caught by checksum."""
import copy

import numpy as np
import pytest
import torch

from speedyrec.data.token_store import FieldTokens, TokenStore
from speedyrec.distill.bank import TeacherBank, equal_length_chunks
from speedyrec.distill.snapshots import SnapshotError, load_snapshot, read_snapshot, save_snapshot
from speedyrec.engine.distributed import DistInfo
from speedyrec.models.backbone import BertFamilyBackbone, random_bert
from speedyrec.models.checksum import weights_checksum
from speedyrec.models.frozen_prefix import FrozenCachePlace
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import NewsEncoder
from speedyrec.models.shared_prefix import SharedPrefixStack, shared_frozen_depth

SHAPE = dict(hidden=32, layers=4, heads=4, intermediate=64)


def _store(n=40, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 14, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(5, 90, int(offsets[-1])).astype(np.int32)
    return TokenStore({"title": FieldTokens(tokens, offsets, 16)}, 1, 2, 0)


def _teachers(m=3, freeze=3, differ_from=2, seed=0):
    """M encoders on one random base whose layers >= ``differ_from`` were changed differently (post-training)."""
    torch.manual_seed(seed)
    base = random_bert(SHAPE, vocab_size=100, pad_id=0)
    out = []
    for i in range(m):
        hf = copy.deepcopy(base)
        with torch.no_grad():
            for layer in hf.encoder.layer[differ_from:]:
                for p in layer.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        torch.manual_seed(100 + i)
        out.append(NewsEncoder(BertFamilyBackbone(hf, freeze_layers=freeze), dim=8, attention_dim=6).eval())
    return out


def _alone(enc, inputs, news):
    tokens = inputs.prepare(news)
    with torch.no_grad():
        return enc(tokens.input_ids, tokens.mask)


def test_shared_depth_is_the_common_frozen_prefix():
    teachers = _teachers(freeze=3, differ_from=2)
    assert shared_frozen_depth([t.backbone for t in teachers]) == 2
    assert shared_frozen_depth([t.backbone for t in _teachers(freeze=1, differ_from=2)]) == 1  # capped by freezing
    assert shared_frozen_depth([t.backbone for t in _teachers(freeze=0)]) is None  # embeddings train
    other = _teachers(m=1, seed=1)[0]
    assert shared_frozen_depth([teachers[0].backbone, other.backbone]) is None  # another base


@pytest.mark.parametrize("cached", [False, True])
def test_shared_prefix_stack_equals_each_teacher_alone(tmp_path, cached):
    teachers = _teachers()
    stack = SharedPrefixStack(teachers)
    inputs = NewsInputs(_store())
    if cached:
        stack.enable_caches(inputs.lengths(np.arange(40)), FrozenCachePlace(tmp_path, torch.float32, True, False),
                            "teachers")
    rng = np.random.default_rng(3)
    for _ in range(4):  # overlapping batches: later ones read the caches
        news = rng.integers(0, 40, 15)
        tokens = inputs.prepare(news)
        with torch.no_grad():
            got = stack(tokens.input_ids, tokens.mask, news if cached else None)
        for i, t in enumerate(teachers):
            torch.testing.assert_close(got[:, i], _alone(t, inputs, news), atol=1e-5, rtol=1e-5)
    if cached:
        assert stack.shared_cache.hits > 0 and all(c.hits > 0 for c in stack.own_caches)


def test_shared_prefix_stack_trains_only_the_top_layers():
    teachers = _teachers()
    for t in teachers:
        t.train()
    stack = SharedPrefixStack(teachers)
    inputs = NewsInputs(_store())
    tokens = inputs.prepare(np.arange(10))
    stack(tokens.input_ids, tokens.mask).sum().backward()
    for t in teachers:
        bb = t.backbone
        assert all(p.grad is None for layer in bb.layers[:3] for p in layer.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.layers[3].parameters())


def test_equal_length_chunks_are_padding_free_and_cover_every_row():
    lengths = np.random.default_rng(0).integers(3, 30, 500)
    chunks = equal_length_chunks(lengths, 64)
    rows = np.concatenate(chunks)
    assert sorted(rows.tolist()) == list(range(500))
    for c in chunks:
        assert len(set(lengths[c].tolist())) == 1
        assert len(c) * lengths[c][0] <= 64 or len(c) == 1


def test_teacher_bank_returns_what_the_teacher_computes_online(tmp_path):
    teachers = _teachers()
    stack = SharedPrefixStack(teachers)
    inputs = NewsInputs(_store())
    sums = [weights_checksum(t) for t in teachers]
    wanted = np.arange(0, 40, 2)
    bank, build = TeacherBank.open_or_build(stack, sums, inputs, wanted, tmp_path, DistInfo(), chunk_tokens=40)
    assert build.news_encoded == len(wanted) * 3 and build.padded_tokens == 0 and build.valid_tokens > 0
    online = np.array([4, 0, 38, 4, 10])
    got = bank.read(online, torch.device("cpu"))
    for i, t in enumerate(teachers):
        torch.testing.assert_close(got[:, i], _alone(t, inputs, online), atol=1e-5, rtol=1e-5)
    # a second run finds everything stored; a new news is added without recomputing the rest
    again, build = TeacherBank.open_or_build(stack, sums, inputs, wanted, tmp_path, DistInfo())
    assert build.news_encoded == 0
    more, build = TeacherBank.open_or_build(stack, sums, inputs, np.r_[wanted, 5], tmp_path, DistInfo())
    assert build.news_encoded == 3
    torch.testing.assert_close(more.read(np.array([5]), torch.device("cpu"))[:, 0], _alone(teachers[0], inputs, np.array([5])),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="outside the bank"):
        more.read(np.array([7]), torch.device("cpu"))
    # vectors computed in bf16 are another bank: neither precision reads the other's
    half, build = TeacherBank.open_or_build(stack, sums, inputs, wanted, tmp_path, DistInfo(), amp="bf16")
    assert build.news_encoded == len(wanted) * 3 and half.directories != again.directories
    assert not torch.equal(half.read(online, torch.device("cpu")), got)
    assert TeacherBank.open_or_build(stack, sums, inputs, wanted, tmp_path, DistInfo(), amp="off")[1].news_encoded == 0


def test_a_bank_of_buslm_teachers_on_refined_text_equals_each_teacher_alone(tmp_path):
    """BusLM teachers (a field cut into two segments) with refined text's frequency embedding: their shared frozen
    prefix runs once, with the bus; each one's own frozen layers are cached; the embedding joins each teacher above
    its frozen layers: every teacher's bank vectors equal its own encoding of the news, and the bank is keyed by
    the segment layout."""
    from types import SimpleNamespace

    from speedyrec.models.buslm import BusLMNewsEncoder

    rng = np.random.default_rng(1)

    def field(max_tokens):
        lengths = rng.integers(0, max_tokens - 1, 40)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = rng.integers(5, 90, int(offsets[-1])).astype(np.int32)
        return FieldTokens(tokens, offsets, max_tokens, rng.integers(1, 6, len(tokens)).astype(np.int8))

    inputs = NewsInputs(TokenStore({"title": field(10), "body": field(18)}, 1, 2, 0), ["title", "body", "body"])
    teachers = []
    for enc in _teachers(m=2, freeze=3, differ_from=2):
        frequency = torch.nn.Embedding(16, SHAPE["hidden"], padding_idx=0)
        teachers.append(SimpleNamespace(news_encoder=BusLMNewsEncoder.from_news_encoder(enc).eval(),
                                        frequency=frequency))
    stack = SharedPrefixStack([t.news_encoder for t in teachers], [t.frequency for t in teachers])
    assert stack.shared_depth == 2
    stack.enable_caches(inputs.lengths(np.arange(40)), FrozenCachePlace(tmp_path, torch.float32, True, False), "t")
    news = np.arange(40)
    bank, build = TeacherBank.open_or_build(stack, ["a" * 64, "b" * 64], inputs, news, tmp_path / "banks", DistInfo(),
                                            chunk_tokens=64)
    assert build.news_encoded == 2 * 40 and stack.shared_cache.computed == 40
    got = bank.read(news, torch.device("cpu"))
    with torch.no_grad():
        for i, t in enumerate(teachers):
            torch.testing.assert_close(got[:, i], inputs.encode(t, inputs.prepare(news))[0], atol=1e-5, rtol=1e-5)
    # the same teachers and tokens read as one sequence are another bank
    plain = SharedPrefixStack(_teachers(m=2, freeze=3, differ_from=2))
    other, _ = TeacherBank.open_or_build(plain, ["a" * 64, "b" * 64], NewsInputs(inputs.store), news,
                                         tmp_path / "banks", DistInfo())
    assert all("-segments-" in d.name for d in bank.directories) and not set(bank.directories) & set(other.directories)
    stack.close_caches()


def _saved_teacher(tmp_path):
    torch.manual_seed(0)
    enc = NewsEncoder(BertFamilyBackbone(random_bert(SHAPE, 100, 0), freeze_layers=2), dim=8, attention_dim=6)
    with torch.no_grad():
        for p in enc.backbone.layers[3].parameters():
            p.add_(1.0)  # "post-trained"
    changed = {n for n, p in enc.named_parameters() if p.requires_grad}
    path = tmp_path / "teacher_1.safetensors"
    save_snapshot(path, enc, changed, {"encoder": "random"})
    return enc, path


def _fresh_base(seed=0):
    torch.manual_seed(seed)
    return NewsEncoder(BertFamilyBackbone(random_bert(SHAPE, 100, 0), freeze_layers=2), dim=8, attention_dim=6)


def test_snapshot_round_trip_holds_the_saved_weights(tmp_path):
    enc, path = _saved_teacher(tmp_path)
    fresh = _fresh_base()
    load_snapshot(fresh, path, "teacher 1")
    for (name, a), b in zip(enc.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert path.stat().st_size < sum(t.numel() * 4 for t in enc.state_dict().values())  # only the delta is stored


def test_checksum_catches_a_teacher_that_did_not_load_its_weights(tmp_path, monkeypatch):
    _, path = _saved_teacher(tmp_path)
    import speedyrec.distill.snapshots as snapshots

    # what the authors' public code does: a load that silently keeps the initial weights
    monkeypatch.setattr(snapshots, "apply_delta", lambda module, snap, p: None)
    with pytest.raises(SnapshotError, match="does not hold the weights"):
        snapshots.load_snapshot(_fresh_base(), path, "teacher 1")


def test_checksum_catches_another_base_encoder(tmp_path):
    _, path = _saved_teacher(tmp_path)
    with pytest.raises(SnapshotError, match="does not hold the weights"):
        load_snapshot(_fresh_base(seed=1), path, "teacher 1")  # the delta loads, the frozen layers differ


def test_not_a_snapshot_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "x.safetensors").write_bytes(b"not a model")
    with pytest.raises(SnapshotError, match="not a speedyrec snapshot"):
        load_snapshot(_fresh_base(), tmp_path / "x.safetensors", "teacher")
    save_file({"w": torch.zeros(2)}, tmp_path / "y.safetensors")  # safetensors, but no snapshot's header
    with pytest.raises(SnapshotError, match="not a speedyrec snapshot.*None"):
        load_snapshot(_fresh_base(), tmp_path / "y.safetensors", "teacher")
    with pytest.raises(SnapshotError, match="no model file"):
        load_snapshot(_fresh_base(), tmp_path / "missing.safetensors", "teacher")


def test_a_pickled_snapshot_is_refused_unopened_and_converts_when_trusted(tmp_path):
    """A snapshot of the earlier pickle format is refused with the command that converts it, without unpickling
    it (a crafted one would create a file); the converter reads only data, so the crafted one stays refused and
    a genuine one converts to the weights it held. A folder of old snapshots names the converter too."""
    from speedyrec import checkpoint as convert_cli
    from speedyrec.distill.teachers import model_files

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    enc, path = _saved_teacher(tmp_path)
    snap = read_snapshot(path)
    old = {"format": "speedyrec-snapshot/1", "delta": snap["delta"], "checksum": snap["checksum"], "meta": snap["meta"]}
    crafted = tmp_path / "crafted" / "teacher_1.pt"
    crafted.parent.mkdir()
    torch.save({**old, "meta": {"encoder": Payload()}}, crafted)
    with pytest.raises(SnapshotError, match="older speedyrec as a pickle.*speedyrec.checkpoint convert"):
        load_snapshot(_fresh_base(), crafted, "teacher 1")
    with pytest.raises(SnapshotError, match="older speedyrec as pickles.*speedyrec.checkpoint convert"):
        model_files(crafted.parent, "teachers", "finetune_teachers")
    assert convert_cli.main(["convert", str(crafted)]) == 1 and crafted.exists()
    assert not marker.exists()
    genuine = tmp_path / "genuine" / "teacher_1.pt"
    genuine.parent.mkdir()
    torch.save(old, genuine)
    assert convert_cli.main(["convert", str(genuine.parent)]) == 0 and not genuine.exists()
    fresh = _fresh_base()
    load_snapshot(fresh, model_files(genuine.parent, "teachers", "finetune_teachers")[0], "teacher 1")
    for (name, a), b in zip(enc.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
