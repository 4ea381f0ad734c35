"""The tokenized news store: round trip, layout of assembled batches, cache keys and invalidation."""
import numpy as np
import pytest

from speedyrec.data.token_store import TokenStore, build_or_load_field
from speedyrec.models.backbone import train_wordpiece_tokenizer

TEXTS = [
    "Quarterback throws four touchdowns in the playoff win",
    "",
    "Senate passes the budget after a long night of votes and amendments, sending it to the house",
    "Stocks rally on strong earnings",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = TEXTS * 5 + ["the a of and to in on after before with"] * 5
    return train_wordpiece_tokenizer(corpus, 200, tmp_path_factory.mktemp("tok") / "wp.json")


def test_round_trip_equals_the_tokenizer(tmp_path, tokenizer):
    field, built = build_or_load_field(tmp_path, "title", TEXTS, tokenizer, max_tokens=12)
    assert built
    for i, text in enumerate(TEXTS):
        want = tokenizer(text, add_special_tokens=False)["input_ids"][:10]
        got = field.tokens[field.offsets[i]:field.offsets[i + 1]].tolist()
        assert got == want
    assert isinstance(field.tokens, np.memmap)  # memory-mapped, not read into Python objects


def test_cache_hit_and_invalidation(tmp_path, tokenizer, tmp_path_factory):
    _, built = build_or_load_field(tmp_path, "title", TEXTS, tokenizer, 12)
    assert built
    _, built = build_or_load_field(tmp_path, "title", TEXTS, tokenizer, 12)
    assert not built  # same content, tokenizer and length: reused
    changed = TEXTS[:-1] + ["Stocks fall on weak earnings"]
    f, built = build_or_load_field(tmp_path, "title", changed, tokenizer, 12)
    assert built  # content changed
    assert f.tokens[f.offsets[3]:f.offsets[4]].tolist() == tokenizer(changed[3], add_special_tokens=False)["input_ids"]
    _, built = build_or_load_field(tmp_path, "title", TEXTS, tokenizer, 8)
    assert built  # maximum length changed
    other = train_wordpiece_tokenizer(TEXTS * 5, 120, tmp_path_factory.mktemp("tok2") / "wp.json")
    _, built = build_or_load_field(tmp_path, "title", TEXTS, other, 12)
    assert built  # tokenizer changed
    _, built = build_or_load_field(tmp_path, "title", TEXTS, tokenizer, 12)
    assert not built  # and the first store is still there


def _store(tmp_path, tokenizer, title=12, body=0):
    fields = {"title": build_or_load_field(tmp_path, "title", TEXTS, tokenizer, title)[0]}
    if body:
        fields["abstract"] = build_or_load_field(tmp_path, "abstract", TEXTS[::-1], tokenizer, body)[0]
    return TokenStore(fields, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)


def test_concat_layout_matches_a_slow_reference(tmp_path, tokenizer):
    store = _store(tmp_path, tokenizer, title=12, body=9)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    idx = np.array([2, 0, 1, 3, 0])
    batch = store.concat(idx)
    rows = []
    for i in idx:
        t = tokenizer(TEXTS[i], add_special_tokens=False)["input_ids"][:10]
        a = tokenizer(TEXTS[::-1][i], add_special_tokens=False)["input_ids"][:7]
        rows.append([cls] + t + [sep] + a + [sep])
    width = max(map(len, rows))
    assert batch.input_ids.shape == (5, width)
    for r, want in enumerate(rows):
        assert batch.input_ids[r, :len(want)].tolist() == want
        assert (batch.input_ids[r, len(want):] == pad).all()
        assert batch.mask[r].tolist() == [True] * len(want) + [False] * (width - len(want))
    assert store.lengths(idx).tolist() == [len(r) for r in rows]
    assert store.max_len == 12 + 9 - 1


def test_fixed_width_and_padding_slots(tmp_path, tokenizer):
    store = _store(tmp_path, tokenizer, title=12)
    b = store.concat(np.array([0, -1, 3]), width=12)
    assert b.input_ids.shape == (3, 12)
    assert b.input_ids[1, :2].tolist() == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert b.mask[1].sum() == 2
    assert b.input_ids[2].tolist() == store.concat(np.array([3]), width=12).input_ids[0].tolist()
    with pytest.raises(AssertionError):
        store.concat(np.array([2]), width=5)


class CountingTokenizer:
    """A stand-in tokenizer (a few ids per text, derived from its length) so that building a million-news
    store takes a second; the real tokenizer's cost is paid once per corpus and is not what this test is about."""

    cls_token_id, sep_token_id, pad_token_id = 1, 2, 0

    def get_vocab(self):
        return {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2}

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[3 + len(t) % 5] * (len(t) % 7) for t in texts]}


def test_a_million_news_load_in_seconds(tmp_path):
    """Loading a store is memory-mapping two arrays (plus hashing the texts for the key)."""
    n = 1_000_000
    texts = [f"headline number {i} about things" for i in range(n)]
    tok = CountingTokenizer()
    _, built = build_or_load_field(tmp_path, "title", texts, tok, 16)
    assert built
    field, built = build_or_load_field(tmp_path, "title", texts, tok, 16)
    assert not built
    # no Python object per token: two memory-mapped arrays (load time is measured in benchmarks, not here)
    assert isinstance(field.tokens, np.memmap) and isinstance(field.offsets, np.memmap)
    assert field.tokens[field.offsets[12345]:field.offsets[12346]].tolist() == tok([texts[12345]])["input_ids"][0]
    store = TokenStore({"title": field}, 1, 2, 0)
    batch = store.concat(np.arange(0, n, 997))
    assert batch.input_ids.shape[0] == len(range(0, n, 997))


def test_a_field_named_twice_fills_two_segments(tmp_path, tokenizer):
    """A long body split into consecutive parts, each its own [CLS] part [SEP] segment; nothing is lost
    or repeated, and no part takes another field's length."""
    body = build_or_load_field(tmp_path, "body", TEXTS, tokenizer, 14)[0]  # 12 content tokens -> 2 parts of 6
    title = build_or_load_field(tmp_path, "title", TEXTS, tokenizer, 5)[0]
    store = TokenStore({"title": title, "body": body}, tokenizer.cls_token_id, tokenizer.sep_token_id,
                       tokenizer.pad_token_id)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    idx = np.arange(len(TEXTS))
    seg = store.segments(idx, ["title", "body", "body"])
    assert seg.input_ids.shape[1] == 3
    assert store.segment_width(["title", "body", "body"]) == 8
    for i in idx:
        content = body.tokens[body.offsets[i]:body.offsets[i + 1]].tolist()
        parts = []
        for j in (1, 2):
            row = seg.input_ids[i, j][seg.mask[i, j]].tolist()
            if row:
                assert row[0] == cls and row[-1] == sep and len(row) <= 8
                parts += row[1:-1]
        assert parts == content  # the two parts are the body, in order, once
        t = seg.input_ids[i, 0][seg.mask[i, 0]].tolist()
        assert t[1:-1] == title.tokens[title.offsets[i]:title.offsets[i + 1]].tolist() and len(t) <= 5
