"""Content refinement: ordered bag of words, BM25 top-k filtering and tokenization with word counts."""
import copy
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from speedyrec.data import refine as R
from speedyrec.data.refine import BM25Refiner, load_stopwords, ordered_bag_of_words, tokenize_refined
from speedyrec.models.backbone import train_wordpiece_tokenizer

DOC_FEATURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "speedyrec_example" / "traindata" / "DocFeatures.tsv"

TENNIS = (
    "Tennis star Novak Djokovic has again voiced concern for lower-ranked players, as the pandemic-hit "
    "2020 season nears its end. Djokovic, the world's top-ranked man, said players outside the top 500 "
    "are struggling -- and voiced worries about the 2021 calendar!"
)

# A small training corpus: "market" is in 6 of 8 documents, so rank-bm25 floors its idf with epsilon.
TRAIN = [
    "The market rallied on Monday as tech stocks climbed and the market closed higher.",
    "Oil prices fell sharply while the stock market shrugged off the news.",
    "A new vaccine trial reported strong results, lifting the market and hopes for recovery.",
    "The local team won the championship after a dramatic overtime goal.",
    "Market analysts expect the central bank to hold interest rates steady this month.",
    "Heavy rain flooded streets downtown; officials urged drivers to stay home.",
    "Investors watched the bond market as yields climbed for a third straight week.",
    "The farmers market reopened with fresh apples, pumpkins and cider for the autumn season.",
]


def plain_tokens(text, stop):
    """Reference word sequence (stopwords removed) for rank-bm25's own BM25Okapi."""
    return [w for w in R._words(text) if w not in stop]


def reference_scores(bm25: BM25Okapi, bag, k1=2.0, b=0.75):
    n_docs = bm25.corpus_size
    doc_len = sum(c for _, c in bag)
    out = []
    for word, tf in bag:
        idf = bm25.idf[word] if word in bm25.idf else math.log(n_docs + 0.5) - math.log(0.5)
        out.append(idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_len / bm25.avgdl)))
    return np.array(out)


@pytest.fixture(scope="module")
def stop():
    return load_stopwords()


@pytest.fixture(scope="module")
def fitted(stop):
    refiner = BM25Refiner().fit(TRAIN)
    vanilla = BM25Okapi([plain_tokens(t, stop) for t in TRAIN], k1=2.0, b=0.75)
    return refiner, vanilla


# ------------------------------------------------------------------ stopwords and ordered bag of words
def test_stopword_list_is_package_data():
    stop = load_stopwords()
    assert 150 <= len(stop) <= 260
    assert {"the", "and", "of", "is", "were", "don't", "its", "about"} <= stop
    assert not {"market", "djokovic", "season", "2020"} & stop
    assert all(w == w.strip().lower() and w for w in stop)
    assert load_stopwords() is stop  # read once


def test_ordered_bag_of_words_on_a_paragraph():
    assert ordered_bag_of_words(TENNIS) == [
        ("tennis", 1), ("star", 1), ("novak", 1), ("djokovic", 2), ("voiced", 2), ("concern", 1),
        ("lower", 1), ("ranked", 2), ("players", 2), ("pandemic", 1), ("hit", 1), ("2020", 1),
        ("season", 1), ("nears", 1), ("end", 1), ("world", 1), ("top", 2), ("man", 1), ("said", 1),
        ("500", 1), ("struggling", 1), ("worries", 1), ("2021", 1), ("calendar", 1),
    ]


def test_ordered_bag_of_words_without_stopwords_and_word_rules():
    bag = dict(ordered_bag_of_words("The THE the, a  cat's cat", stopwords=frozenset()))
    assert bag == {"the": 3, "a": 1, "cat": 2}
    # apostrophes: curly or straight, contractions stay whole (and are stopwords), possessives drop 's
    assert ordered_bag_of_words("O\u2019Neill didn't say it's Paris' mayor's \u2018plan\u2019") == [
        ("o'neill", 1), ("say", 1), ("paris", 1), ("mayor", 1), ("plan", 1)]
    # digits, hyphens, underscores, soft hyphens, non-ASCII punctuation and letters
    assert ordered_bag_of_words("COVID-19 co\u00adop caf\u00e9\u2014bar_x \u00bbQuote\u00ab 3.5%") == [
        ("covid", 1), ("19", 1), ("coop", 1), ("caf\u00e9", 1), ("bar", 1), ("x", 1), ("quote", 1),
        ("3", 1), ("5", 1)]
    assert ordered_bag_of_words("") == [] and ordered_bag_of_words(" ,.;-- the of ") == []


@pytest.mark.parametrize("text", [
    TENNIS, "it's world's o'neill's rock'n'roll 'quoted' ''s x's_y", "caf\u0065\u0301 na\u00efve \u00a0nbsp\u00a0x",
    "a\u2019s \u2019s's s' zero\u200bwidth \ufeffbom A_B__c", "\u0130stanbul STRASSE stra\u00dfe \U0001F31F star\U0001F31Fdust",
])
def test_fast_bag_matches_the_regex_definition(text, stop):
    want = {w: c for w, c in Counter(R._words(text)).items() if w not in stop}
    assert list(R._bag(text, stop).items()) == list(want.items())


# ------------------------------------------------------------------ BM25
def test_fit_matches_rank_bm25(fitted):
    refiner, vanilla = fitted
    assert refiner.corpus_size == vanilla.corpus_size == len(TRAIN)
    assert refiner.avgdl == vanilla.avgdl
    assert refiner.average_idf == vanilla.average_idf
    assert refiner.idf == vanilla.idf  # exact values, epsilon floor included
    n = refiner.corpus_size
    floored = refiner.epsilon * refiner.average_idf
    assert refiner.idf["market"] == floored  # in 6 of 8 documents: ln(2.5) - ln(6.5) < 0 gets the floor
    assert refiner.idf["climbed"] == pytest.approx(math.log(n - 2 + 0.5) - math.log(2 + 0.5))


def test_scores_equal_the_formula_and_rank_bm25(fitted, stop):
    refiner, vanilla = fitted
    for d, text in enumerate(TRAIN):
        bag = ordered_bag_of_words(text)
        got = refiner.scores(bag)
        np.testing.assert_allclose(got, reference_scores(vanilla, bag), rtol=1e-12)
        # each word's score is rank-bm25's score of that one-word query on this training document ...
        for (word, _), s in zip(bag, got):
            assert vanilla.get_scores([word])[d] == pytest.approx(s, rel=1e-12)
        # ... and the query made of the document's distinct words scores the sum
        assert vanilla.get_scores([w for w, _ in bag])[d] == pytest.approx(got.sum(), rel=1e-12)
    # a one-word query over the whole corpus: zero where the word is absent
    q = "climbed"
    per_doc = [dict(zip([w for w, _ in ordered_bag_of_words(t)], refiner.scores(ordered_bag_of_words(t)))).get(q, 0.0)
               for t in TRAIN]
    np.testing.assert_allclose(vanilla.get_scores([q]), per_doc, rtol=1e-12)
    assert refiner.scores([]).shape == (0,)


def test_idf_is_fitted_once_and_unseen_words_are_rarest(fitted):
    refiner, _ = fitted
    before = (copy.deepcopy(refiner.idf), refiner.avgdl, refiner.corpus_size, refiner.average_idf)
    dev = "Zyzzyva traders watched the market as the zyzzyva index climbed."
    refined = refiner.refine(dev, topk=2)
    refiner.refine_many([dev, TENNIS], topk=3)
    assert (refiner.idf, refiner.avgdl, refiner.corpus_size, refiner.average_idf) == before
    assert "zyzzyva" not in refiner.idf
    assert refiner.unseen_idf == pytest.approx(math.log(2 * len(TRAIN) + 1))
    assert refiner.unseen_idf > max(refiner.idf.values())
    bag = ordered_bag_of_words(dev)
    scores = dict(zip([w for w, _ in bag], refiner.scores(bag)))
    assert scores["zyzzyva"] == max(scores.values())
    assert refined[0] == ("zyzzyva", 2)


def test_refine_keeps_top_k_in_original_order(fitted):
    refiner, _ = fitted
    text = TENNIS + " The market and the stock market climbed; apples and pumpkins season."
    bag = ordered_bag_of_words(text)
    scores = refiner.scores(bag)
    for k in (0, 1, 5, 10, len(bag) - 1):
        want_idx = sorted(sorted(range(len(bag)), key=lambda i: (-scores[i], i))[:k])
        assert refiner.refine(text, k) == [bag[i] for i in want_idx]
    assert refiner.refine(text, len(bag)) == bag
    assert refiner.refine(text, 10 * len(bag)) == bag
    assert refiner.refine("", 5) == [] and refiner.refine("the of and", 5) == []
    with pytest.raises(ValueError):
        refiner.refine(text, -1)


def test_refine_breaks_ties_by_first_appearance(fitted):
    refiner, _ = fitted
    # unseen words, each once: identical scores, so the first ones win
    assert refiner.refine("delta alpha echo bravo charlie", 3) == [("delta", 1), ("alpha", 1), ("echo", 1)]


def test_refine_many_and_fit_refine_agree(stop):
    texts = TRAIN + [TENNIS, ""]
    refiner = BM25Refiner().fit(texts)
    many = refiner.refine_many(texts, 4)
    assert many == [refiner.refine(t, 4) for t in texts]
    other = BM25Refiner()
    assert other.fit_refine(texts, 4) == many
    assert other.idf == refiner.idf and other.avgdl == refiner.avgdl


def test_unfitted_and_empty_corpus_errors():
    with pytest.raises(RuntimeError):
        BM25Refiner().refine("anything", 3)
    with pytest.raises(ValueError):
        BM25Refiner().fit([])
    with pytest.raises(ValueError):
        BM25Refiner().fit(["the of", ""])


# ------------------------------------------------------------------ tokenization with counts
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = TRAIN * 3 + [TENNIS] * 3
    return train_wordpiece_tokenizer(corpus, 120, tmp_path_factory.mktemp("tok") / "wp.json")


def expected_tokens(tokenizer, bag, max_content, max_count):
    ids, counts = [], []
    for word, c in bag:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        ids += pieces
        counts += [min(c, max_count)] * len(pieces)
    return ids[:max_content], counts[:max_content]


@pytest.mark.parametrize("max_content", [7, 64])
def test_tokenize_refined_round_trip(tokenizer, max_content):
    bags = [
        [("djokovic", 2), ("o'neill", 40), ("market", 1), ("2020", 16), ("caf\u00e9", 3)],
        [],
        [("pumpkins", 15), ("zyzzyva", 1), ("climbed", 200)],
        ordered_bag_of_words(TENNIS),
    ]
    tokens, counts, offsets = tokenize_refined(tokenizer, bags, max_content=max_content, max_count=15)
    assert tokens.dtype == np.int32 and counts.dtype == np.int8 and offsets.dtype == np.int64
    assert offsets.shape == (len(bags) + 1,) and offsets[0] == 0 and offsets[-1] == len(tokens) == len(counts)
    for i, bag in enumerate(bags):
        got_ids = tokens[offsets[i]:offsets[i + 1]].tolist()
        got_counts = counts[offsets[i]:offsets[i + 1]].tolist()
        joined = tokenizer(" ".join(w for w, _ in bag), add_special_tokens=False)["input_ids"][:max_content]
        want_ids, want_counts = expected_tokens(tokenizer, bag, max_content, 15)
        assert got_ids == joined == want_ids
        assert got_counts == want_counts
    assert (counts >= 1).all() and counts.max() == 15
    # several wordpieces of one word repeat its count
    assert len(tokenizer("pumpkins", add_special_tokens=False)["input_ids"]) > 1


def test_tokenize_refined_dtypes_and_edges(tokenizer):
    tokens, counts, offsets = tokenize_refined(tokenizer, [[("market", 300)]], max_content=8, max_count=1000)
    assert counts.dtype == np.int16 and counts.tolist() == [300] * len(tokens)
    tokens, counts, offsets = tokenize_refined(tokenizer, [], max_content=8)
    assert len(tokens) == len(counts) == 0 and offsets.tolist() == [0]
    tokens, counts, offsets = tokenize_refined(tokenizer, [[], []], max_content=8)
    assert offsets.tolist() == [0, 0, 0]


# ------------------------------------------------------------------ real long documents
@pytest.fixture(scope="module")
def real_bodies():
    if not DOC_FEATURES.is_file():
        pytest.skip(f"real sample not found: {DOC_FEATURES} (shared/data beside the repository)")
    rows = [line.rstrip("\n").split("\t") for line in DOC_FEATURES.open(encoding="utf-8")]
    assert all(len(r) == 6 for r in rows)
    return [r[5] for r in rows]


def test_real_bodies_refined_to_top_32(real_bodies, stop):
    refiner = BM25Refiner().fit(real_bodies)
    refined = refiner.refine_many(real_bodies, 32)
    assert len(refined) == len(real_bodies)
    n_empty = n_long = lifted = 0
    for body, kept in zip(real_bodies, refined):
        bag = ordered_bag_of_words(body)
        assert list(R._bag(body, stop).items()) == [(w, c) for w, c in Counter(R._words(body)).items() if w not in stop]
        if not body.strip():
            n_empty += 1
            assert kept == []
            continue
        assert len(kept) == min(32, len(bag))
        assert not {w for w, _ in kept} & stop
        position = {w: i for i, (w, _) in enumerate(bag)}
        assert [position[w] for w, _ in kept] == sorted(position[w] for w, _ in kept)  # original order
        assert all(dict(bag)[w] == c >= 1 for w, c in kept)
        if len(bag) > 32:  # kept words are the document's distinctive ones: rarer than its average word
            n_long += 1
            lifted += np.mean([refiner.idf[w] for w, _ in kept]) > np.mean([refiner.idf[w] for w, _ in bag])
    assert n_empty == 3
    assert n_long > 300 and lifted >= 0.95 * n_long


def test_real_bodies_tokenize(real_bodies, tmp_path):
    refined = BM25Refiner().fit_refine(real_bodies, 32)
    tok = train_wordpiece_tokenizer(real_bodies[:200], 3000, tmp_path / "wp.json")
    tokens, counts, offsets = tokenize_refined(tok, refined, max_content=48)
    assert len(offsets) == len(real_bodies) + 1 and (np.diff(offsets) <= 48).all()
    assert (counts >= 1).all() and (counts <= 15).all()
    for i in (0, 1, 250, 499):
        want = tok(" ".join(w for w, _ in refined[i]), add_special_tokens=False)["input_ids"][:48]
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == want
