"""Content refinement (SpeedyFeed, section 4.2.1): ordered bag of words + BM25 top-k filtering.

Long news bodies are not simply cut at their head. Each text is first turned into an *ordered bag of
words* (OBoW): lower-cased words, stopwords and punctuation dropped, listed in order of first
appearance, each with its number of occurrences. Every word is then scored with BM25 against an IDF
fitted once on the training news, and only the ``topk`` best words are kept (the paper uses k1 = 2
and the top 32 words per segment), still in their first-appearance order and with their counts.
The counts later feed a "frequency embedding" in the news encoder, see :func:`tokenize_refined`.

Word splitting
    Text is NFC-normalised and lower-cased; soft hyphens and zero-width characters are deleted;
    curly apostrophes become ``'``. A possessive ``'s`` is dropped (``world's`` -> ``world``,
    ``it's`` -> ``it``, a stopword). Words are then maximal runs of Unicode letters and digits,
    joined by single inner apostrophes (``o'neill``, ``don't``); everything else separates words,
    so ``coronavirus-ravaged`` gives ``coronavirus``, ``ravaged`` and ``covid-19`` gives ``covid``,
    ``19``. Numbers are words (``2020`` is informative in news).

BM25 (``rank_bm25.BM25Okapi``, version 0.2.2)
    With N training documents and n(w) the number of them containing w, rank-bm25 sets
    ``idf(w) = ln(N - n(w) + 0.5) - ln(n(w) + 0.5)``. That is negative for words in more than half
    of the documents; those words get the floor ``epsilon * mean_idf`` instead, where ``mean_idf``
    is the mean of the *unfloored* idf over the training vocabulary and epsilon = 0.25. A word
    never seen in training is given n(w) = 0 under the same formula, ``ln(N + 0.5) - ln(0.5) =
    ln(2N + 1)``, which exceeds every fitted idf (the rarest possible word); the floor never
    applies to it. The score of word w in a text d is

        idf(w) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))

    with tf the count of w in d, |d| the number of words of d after stopword removal and avgdl the
    mean of that length over the training corpus. This is exactly the per-term summand of
    ``BM25Okapi.get_scores``, so for a training document the scores of its words add up to
    ``get_scores(<its distinct words>)`` for that document.

    The IDF, avgdl and N are fitted once (:meth:`BM25Refiner.fit`, training news only) and reused
    unchanged for dev/test news. Empty training texts count as documents, as in rank-bm25.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from importlib import resources
from itertools import chain, repeat

import numpy as np
from rank_bm25 import BM25Okapi

__all__ = ["ordered_bag_of_words", "load_stopwords", "BM25Refiner", "tokenize_refined"]

_INVISIBLE = {ord(c): None for c in "\u00ad\u200b\u200c\u200d\u2060\ufeff"}
_APOSTROPHES = {ord(c): "'" for c in "\u2019\u2018\u02bc\u00b4"}
_TRANSLATE = {**_INVISIBLE, **_APOSTROPHES}
_POSSESSIVE = re.compile(r"(?<=[^\W_])'s(?![^\W_])")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
# UTF-8 byte table: every ASCII character other than a letter, a digit or ' becomes a space; bytes
# >= 0x80 (parts of non-ASCII characters) are left alone for the exact path in _split_odd.
_ASCII_SEP = bytes(c if c >= 0x80 or chr(c).isalnum() or c == 0x27 else 0x20 for c in range(256))


@lru_cache(maxsize=None)
def _stopwords(include_nltk: bool) -> frozenset[str]:
    text = resources.files("speedyrec.data").joinpath("stopwords_en.txt").read_text(encoding="utf-8")
    words = {w.strip().lower() for w in text.splitlines()}
    words.discard("")
    if include_nltk:
        try:  # only a locally installed corpus: never downloads
            from nltk.corpus import stopwords as nltk_stopwords

            words.update(w.lower() for w in nltk_stopwords.words("english"))
        except (LookupError, ImportError, OSError):
            pass
    return frozenset(words)


def load_stopwords(include_nltk: bool = False) -> frozenset[str]:
    """The package's English stopword list (``speedyrec/data/stopwords_en.txt``).

    ``include_nltk=True`` adds nltk's English list when its corpus happens to be installed locally;
    it is off by default so that refined content does not depend on the machine it was built on.
    """
    return _stopwords(bool(include_nltk))


def _prepare(text: str) -> str:
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.lower()


def _words(text: str) -> list[str]:
    """All words of ``text`` in order, stopwords included: the definition of word splitting.

    Straightforward regex version over the whole text; :func:`_bag` computes the same counts about
    several times faster and is what the refiner uses (their agreement is tested).
    """
    if not text:
        return []
    text = _prepare(text).translate(_TRANSLATE)
    return _WORD.findall(_POSSESSIVE.sub("", text))


@lru_cache(maxsize=1 << 16)
def _split_odd(chunk: str) -> tuple[str, ...]:
    """Words of a whitespace-free, already lower-cased chunk holding ' or non-ASCII characters."""
    return tuple(_WORD.findall(_POSSESSIVE.sub("", chunk.translate(_TRANSLATE))))


def _bag(text: str, stopwords: frozenset[str]) -> dict[str, int]:
    """word -> count in order of first appearance (dicts keep insertion order), stopwords removed.

    ASCII punctuation is turned into spaces with a byte table and the text split on whitespace; the
    few distinct chunks that are not purely alphanumeric (apostrophes, non-ASCII punctuation) go
    through the exact regex rules of :func:`_words`. Chunks are counted before they are fixed up,
    and visiting the distinct chunks in first-appearance order keeps the words in that order too.
    """
    if not text:
        return {}
    chunks = Counter(_prepare(text).encode("utf-8", "surrogatepass").translate(_ASCII_SEP).decode("utf-8", "surrogatepass").split())
    if all(map(str.isalnum, chunks)):
        return {w: c for w, c in chunks.items() if w not in stopwords}
    bag: dict[str, int] = {}
    get = bag.get
    for chunk, c in chunks.items():
        if chunk.isalnum():
            if chunk not in stopwords:
                bag[chunk] = get(chunk, 0) + c
        else:
            for w in _split_odd(chunk):
                if w not in stopwords:
                    bag[w] = get(w, 0) + c
    return bag


def ordered_bag_of_words(text: str, stopwords: frozenset[str] | None = None) -> list[tuple[str, int]]:
    """``[(word, count), ...]`` of ``text`` in order of first appearance, stopwords removed.

    ``stopwords=None`` uses :func:`load_stopwords`; pass ``frozenset()`` to keep every word.
    """
    if stopwords is None:
        stopwords = load_stopwords()
    return list(_bag(text, stopwords).items())


class _BagBM25Okapi(BM25Okapi):
    """``BM25Okapi`` fed ordered bags (word -> count) instead of token lists.

    rank-bm25 keeps one word->frequency dict per training document, which for 100k bodies costs
    gigabytes; only the document frequencies and lengths are needed to fit the IDF. This subclass
    replaces the counting step (``_initialize``) and keeps rank-bm25's own ``_calc_idf`` (formula and
    epsilon floor). Document frequencies are accumulated in the same order as rank-bm25 would, so
    the fitted idf is bit-identical (checked in tests/test_refine.py). ``get_scores`` is unusable on
    this object (no per-document frequencies are kept).
    """

    def _initialize(self, corpus):
        nd: Counter = Counter()
        total = 0
        for bag in corpus:
            length = sum(bag.values())
            self.doc_len.append(length)
            total += length
            nd.update(bag.keys())
            self.corpus_size += 1
        if self.corpus_size == 0:
            raise ValueError("BM25Refiner.fit: empty training corpus")
        if not nd:
            raise ValueError("BM25Refiner.fit: the training corpus has no words after stopword removal")
        self.avgdl = total / self.corpus_size
        return dict(nd)


class BM25Refiner:
    """Keeps the top-k BM25 words of a text, in first-appearance order, with their counts."""

    def __init__(self, k1: float = 2.0, b: float = 0.75, stopwords: frozenset[str] | None = None, *, epsilon: float = 0.25):
        self.k1 = float(k1)
        self.b = float(b)
        self.epsilon = float(epsilon)
        self.stopwords = load_stopwords() if stopwords is None else frozenset(stopwords)
        self.idf: dict[str, float] | None = None
        self.avgdl: float | None = None
        self.corpus_size: int | None = None
        self.average_idf: float | None = None
        self.unseen_idf: float | None = None

    # ---------------------------------------------------------------- fitting
    def fit(self, texts: list[str]) -> "BM25Refiner":
        """Fit IDF and avgdl on the training news texts (once; dev/test texts must not be passed)."""
        stop = self.stopwords
        return self._fit_bags(_bag(t or "", stop) for t in texts)

    def fit_refine(self, texts: list[str], topk: int) -> list[list[tuple[str, int]]]:
        """``fit(texts)`` then ``refine_many(texts, topk)``, splitting each training text only once."""
        topk = _check_topk(topk)
        stop = self.stopwords
        bags = [_bag(t or "", stop) for t in texts]
        self._fit_bags(bags)
        return self._select(bags, topk)

    def _fit_bags(self, bags) -> "BM25Refiner":
        bm25 = _BagBM25Okapi(bags, k1=self.k1, b=self.b, epsilon=self.epsilon)
        self.idf = bm25.idf
        self.avgdl = float(bm25.avgdl)
        self.corpus_size = int(bm25.corpus_size)
        self.average_idf = float(bm25.average_idf)
        # document frequency 0 under rank-bm25's formula: ln(N + 0.5) - ln(0.5)
        self.unseen_idf = math.log(self.corpus_size + 0.5) - math.log(0.5)
        return self

    def _check_fitted(self):
        if self.idf is None:
            raise RuntimeError("BM25Refiner is not fitted: call fit() on the training texts first")

    def idf_of(self, word: str) -> float:
        self._check_fitted()
        return self.idf.get(word, self.unseen_idf)

    # ---------------------------------------------------------------- scoring
    def _score(self, idf: np.ndarray, tf: np.ndarray, doc_len: np.ndarray) -> np.ndarray:
        k1, b = self.k1, self.b
        return idf * (tf * (k1 + 1.0)) / (tf + k1 * (1.0 - b + b * doc_len / self.avgdl))

    def scores(self, bag: list[tuple[str, int]]) -> np.ndarray:
        """BM25 score of each word of ``bag`` (the full ordered bag of one text), float64."""
        self._check_fitted()
        if not bag:
            return np.zeros(0, dtype=np.float64)
        words = [w for w, _ in bag]
        tf = np.fromiter((c for _, c in bag), dtype=np.float64, count=len(bag))
        idf = np.fromiter(map(self.idf.get, words, repeat(self.unseen_idf)), dtype=np.float64, count=len(bag))
        return self._score(idf, tf, np.float64(tf.sum()))

    # ---------------------------------------------------------------- refining
    def refine(self, text: str, topk: int) -> list[tuple[str, int]]:
        return self.refine_many([text], topk)[0]

    def refine_many(self, texts: list[str], topk: int) -> list[list[tuple[str, int]]]:
        """:meth:`refine` over many texts (each split, scored and filtered in one streaming pass)."""
        self._check_fitted()
        topk = _check_topk(topk)
        stop = self.stopwords
        return [self._refine_bag(_bag(t or "", stop), topk) for t in texts]

    def _select(self, bags: list[dict[str, int]], topk: int) -> list[list[tuple[str, int]]]:
        topk = _check_topk(topk)
        return [self._refine_bag(bag, topk) for bag in bags]

    def _refine_bag(self, bag: dict[str, int], topk: int) -> list[tuple[str, int]]:
        """Top-``topk`` words of one bag by BM25, back in first-appearance order.

        Scoring is vectorised within the text. A stable argsort of -score ranks the words, so equal
        scores keep first-appearance order. Scoring each text right after splitting it, while its
        strings are still in cache, measured faster than one flat pass over all texts.
        """
        n = len(bag)
        if n <= topk:
            return list(bag.items())
        tf = np.fromiter(bag.values(), dtype=np.float64, count=n)
        idf = np.fromiter(map(self.idf.get, bag, repeat(self.unseen_idf)), dtype=np.float64, count=n)
        score = self._score(idf, tf, tf.sum())
        keep = np.argsort(-score, kind="stable")[:topk]
        keep.sort()
        items = list(bag.items())
        return [items[j] for j in keep.tolist()]


def _check_topk(topk: int) -> int:
    topk = int(topk)
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    return topk


def tokenize_refined(tokenizer, bags: list[list[tuple[str, int]]], max_content: int, max_count: int = 15):
    """Tokenize refined bags into flat arrays for the token store.

    Each bag's words are joined by single spaces and tokenized with the HF *fast* ``tokenizer`` (no
    special tokens, truncated to ``max_content`` tokens), in one batched call. Returns ``(tokens,
    counts, offsets)``: ``tokens`` int32 flat; ``counts`` flat and aligned with ``tokens``, the count
    of the word each token came from, capped at ``max_count`` (int8, or int16 when ``max_count`` >
    127), so a word split into several pieces repeats its count; ``offsets`` int64 ``[N + 1]``,
    bag i owns ``tokens[offsets[i]:offsets[i + 1]]``.

    Tokens are mapped back to words through the character offsets of the tokens (the last
    character of a token lies inside its word), which works whatever the tokenizer's
    pre-tokenizer splits on (e.g. BERT splits ``o'neill`` into three pre-tokens).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_refined needs a fast (Rust-backed) HF tokenizer for offset mappings")
    if max_content < 0:
        raise ValueError(f"max_content must be >= 0, got {max_content}")
    if not 1 <= max_count <= np.iinfo(np.int16).max:
        raise ValueError(f"max_count must be in [1, 32767], got {max_count}")
    count_dtype = np.int8 if max_count <= np.iinfo(np.int8).max else np.int16
    n = len(bags)
    if n == 0 or max_content == 0:
        return np.zeros(0, np.int32), np.zeros(0, count_dtype), np.zeros(n + 1, np.int64)

    texts = [" ".join(w for w, _ in bag) for bag in bags]
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=True,
        max_length=max_content,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    n_tok = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_tok, out=offsets[1:])
    total = int(offsets[-1])
    tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
    if total == 0:
        return tokens, np.zeros(0, count_dtype), offsets

    # Global character coordinates: text i starts at base[i] in the concatenation "t0 t1 ...".
    text_len = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    base = np.zeros(n, dtype=np.int64)
    np.cumsum(text_len[:-1] + 1, out=base[1:])
    # start of every word, per text; word j of text i starts after the previous words and spaces
    n_words = np.fromiter(map(len, bags), dtype=np.int64, count=n)
    word_len = np.fromiter((len(w) for bag in bags for w, _ in bag), dtype=np.int64, count=int(n_words.sum()))
    word_count = np.fromiter((c for bag in bags for _, c in bag), dtype=np.int64, count=len(word_len))
    word_text = np.repeat(np.arange(n, dtype=np.int64), n_words)
    step = word_len + 1  # a word plus its following space
    csum = np.cumsum(step) - step  # global exclusive cumsum over all words
    first_word = np.zeros(n, dtype=np.int64)
    np.cumsum(n_words[:-1], out=first_word[1:])
    has_words = n_words > 0
    text_origin = np.zeros(n, dtype=np.int64)
    text_origin[has_words] = csum[first_word[has_words]]
    word_start = base[word_text] + (csum - text_origin[word_text])

    off = np.fromiter(chain.from_iterable(chain.from_iterable(offs)), dtype=np.int64, count=2 * total).reshape(total, 2)
    tok_text = np.repeat(np.arange(n, dtype=np.int64), n_tok)
    pos = base[tok_text] + np.maximum(off[:, 0], off[:, 1] - 1)
    word_idx = np.searchsorted(word_start, pos, side="right") - 1
    if (word_idx < 0).any() or (word_text[np.maximum(word_idx, 0)] != tok_text).any():
        raise RuntimeError("tokenize_refined: could not map tokens back to their words")
    counts = np.clip(word_count[word_idx], 1, max_count).astype(count_dtype)
    return tokens, counts, offsets
