"""The embedded default data set: a synthetic news-click log in MIND format.

``python -m speedyrec.data.synthetic --out DIR --users N --seed S`` (or ``generate``) writes ``DIR/train``
and ``DIR/dev``, each with MIND's ``news.tsv`` and ``behaviors.tsv`` plus ``bodies.tsv``
(``news_id \\t body``), then ``DIR/COMPLETE`` (the summary as JSON). Everything is built in a hidden
temporary directory next to ``DIR`` and renamed into place, so a crash never leaves a data set that
looks complete, and an existing ``DIR`` is replaced only by a complete one.

What is modelled
----------------
* News. About 2.5 news per user (at least 500), each with a MIND category and subcategory (15
  categories, 55 subcategories, weighted like the real sample: news and sports about 30% each), a
  publish time and a hidden popularity ``w = rank ** -a`` (a random Zipf rank). Titles, abstracts and
  bodies are template sentences whose slots take words from the subcategory's own vocabulary (plus
  words shared by its category), from general news words, places, names and numbers; so a reader who
  understands a title can tell what the news is about.
* Users. Each user has 1-4 favourite subcategories (a Dirichlet split of 70% of their interest),
  some interest in the rest of those categories (18%) and background interest in everything (12%, in
  proportion to how common each subcategory is). ``affinity[u, s] = interest[u, s] / share(s)``: how
  many times more than average user u clicks subcategory s. It is the ground truth (``GroundTruth``).
* Time. Histories are clicks from the 28 days before the collection window, oldest first. Train
  impressions fall in a 6-day window (11/9/2019 to 11/14/2019, as MIND-small's train), dev ones on the
  7th day. All train impressions of a user carry the same history; the dev history is that history plus
  the user's train clicks. Impressions show fresh news (the most recent ~2 days, newest most often; 10%
  of candidates come from any earlier day), so dev shows news that train never mentions, as in MIND.
* Clicks. Histories are drawn without replacement with odds ``affinity * w`` (exactly, see
  ``_sample_histories``). Impressions never show news the user has already read; each has
  ``1 + Poisson`` clicks (at least one, never all candidates), drawn with odds ``affinity * w ** 0.5``:
  interest strongly, popularity moderately. 8% of impressions get one of their clicks on a random
  candidate (noise).
* Popularity. The exponent ``a`` is not fixed: ``generate`` searches it (false position over the whole
  click simulation with common random numbers) so that the top ``head_fraction`` of news make
  ``head_share`` of the clicks. Clicks are counted as in the real sample's README: every history entry on
  every behaviors line plus every clicked candidate, both splits, among all news the behaviors
  mention; the head is the top ``max(1, round(fraction * news))``. Because a history never repeats a
  news, a very small head has a ceiling: 1% -> 60% (the SpeedyFeed paper's figure) needs about 2,000
  users or more (a = 2.9 at 2,000 users, 1.3 at 20,000); smaller worlds get the closest share and a
  warning.

Calibration against the real sample (``shared/data/mind_sample``: 5,000 MIND-small train lines)
-------------------------------------------------------------------------------------------------
===============================  ============================  ====================================
train split                      real sample                   generated: 2,000 users, seed 0
===============================  ============================  ====================================
history length per line          mean 32.0, median 18, p90     mean 32.3, median 20, p90 75,
                                 76, p99 201, max 425, 2.1%    p99 201, max 586, 2.0% empty
                                 empty
candidates per impression        mean 37.9, median 24, p10 4,  mean 37.1, median 23, p10 6,
                                 p90 93, max 283, min 2        p90 82, max 300, min 2
click-through rate               3.98%, 1.51 clicks per line   4.06%, 1.51 clicks per line
impressions with every shown     0                             0
news clicked
train impressions per user       (MIND-small: 3.1)             3.3; 69% of users also in dev
title words                      mean 10.9, median 10          mean 11.0, median 11
abstract words                   mean 34.4, median 24, 5%      mean 35.3, median 28, 4.7% empty
                                 empty
body words                       none in MIND (SpeedyRec       median 393, p90 865
                                 example docs: median 726)
clicks on top 10% / top 1%       0.60 / 0.20                   0.60 / 0.26 (a = 1.16)
===============================  ============================  ====================================

On the dev split, ranking candidates by the true affinity gives a mean per-impression AUC of 0.78, a
tf-idf match of history titles against candidate titles 0.69, random scores 0.5: reading the text
pays. Generation takes about 2 s for 2,000 users and 17 s for 20,000 (one core).

The output is a pure function of the arguments (``numpy.random.default_rng`` streams derived from the
seed), so equal arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------
# Vocabulary: data, in synthetic_vocabulary.json beside this module (read once, at import). Every
# subcategory has its own nouns, verbs (third person singular, headline present tense) and adjectives;
# its category adds shared ones. Subcategory names are MIND's where MIND has a topical one. Weights are
# relative shares within the category; category weights follow the real sample. General slots: n/v/a
# general nouns, verbs, adjectives; P place; F first name; L last name; D day; Q number. Templates: slot
# letters as these, anything else is a literal word; a trailing comma is kept.
# --------------------------------------------------------------------------------------------------

_VOCABULARY = json.loads((Path(__file__).with_name("synthetic_vocabulary.json")).read_text(encoding="utf-8"))
TOPICS: dict[str, dict] = _VOCABULARY["topics"]
GENERAL: dict[str, str] = _VOCABULARY["general"]
TOPIC_SLOTS = ("N", "V", "A")  # topic noun, verb, adjective of the news' subcategory
TITLE_TEMPLATES = tuple(_VOCABULARY["title_templates"])
SENTENCE_TEMPLATES = tuple(_VOCABULARY["sentence_templates"])

# --------------------------------------------------------------------------------------------------
# Calibration constants (see the module docstring for the resulting statistics).
# --------------------------------------------------------------------------------------------------
NEWS_PER_USER = 2.5
MIN_NEWS = 500

DAY = 86_400
TRAIN_START = datetime(2019, 11, 9)  # MIND-small's train window starts on 11/9/2019
HISTORY_DAYS = 28                    # histories are clicks from the 4 weeks before the train window
TRAIN_DAYS = 6
DEV_DAYS = 1
HISTORY_CLICK_LAG_S = 6 * 3600       # mean delay between publishing and a history click

FAVOURITE_MASS = 0.70                # interest on the user's favourite subcategories ...
CATEGORY_MASS = 0.18                 # ... on the rest of their categories ...
BACKGROUND_MASS = 0.12               # ... and on everything, by subcategory share
EXTRA_FAVOURITES_MAX, EXTRA_FAVOURITES_P = 3, 0.4  # 1 + Binomial(3, 0.4) favourite subcategories

HISTORY_MEDIAN, HISTORY_SIGMA, HISTORY_MAX = 19.0, 1.03, 600
EMPTY_HISTORY_SHARE = 0.02
TRAIN_IMPRESSIONS_MEAN, TRAIN_IMPRESSIONS_MAX = 3.2, 30  # 1 + geometric tail, as MIND-small (3.1)
DEV_IMPRESSIONS_P = (0.30, 0.62, 0.08)                   # 0, 1 or 2 dev impressions per user

IMPRESSION_CHUNK = 8192  # impressions per candidate-sampling block (bounds memory)
IMPRESSION_MEDIAN, IMPRESSION_SIGMA, IMPRESSION_MIN, IMPRESSION_MAX = 23.0, 1.0, 2, 300
FRESH_DAYS = 2        # impressions show news from about the last two days ...
MIN_POOL = 600        # ... but never from fewer than this many news (small worlds)
RECENCY_POWER = 2.0   # pool offset = pool * u**2: the newest news are shown most
OLD_SHOWN_SHARE = 0.1 # candidates drawn from all earlier news instead (keeps unpopular news in the data)
EXTRA_CLICK_RATE = 0.0135  # clicks = 1 + Poisson(rate * size): CTR about 4%
IMPRESSION_POPULARITY_POWER = 0.5  # click odds ~ affinity * w**0.5
_KEY_BOUND = 1000.0               # click keys are clipped to +-this; noise clicks get the top value
NOISE_CLICK_SHARE = 0.08           # impressions with one click on a uniformly random candidate

HISTORY_HEAD = 256    # most popular news sampled with explicit keys (see _sample_histories)
HISTORY_CHUNK = 4096  # users per key matrix
MAX_POPULARITY_EXPONENT = 4.0
CALIBRATION_TOLERANCE = 0.003
CALIBRATION_MAX_STEPS = 14
HEAD_SHARE_WARN = 0.02  # warn when the calibrated head share misses the target by more

TITLE_CASE_SHARE = 0.5               # MIND mixes Title Case and sentence case titles
ABSTRACT_EMPTY_SHARE = 0.05
ABSTRACT_MEDIAN, ABSTRACT_SIGMA, ABSTRACT_MAX = 27.0, 0.8, 160
BODY_MEDIAN, BODY_SIGMA, BODY_MAX = 400.0, 0.6, 4000
BODY_CHUNK = 2000                    # news per body-generation chunk (bounds memory)

# Independent random streams: changing one part never shifts the numbers of another.
_STREAM_WORLD, _STREAM_CLICKS, _STREAM_IMPRESSIONS, _STREAM_TEXT, _STREAM_BODIES = range(5)


# --------------------------------------------------------------------------------------------------
# Vocabulary compiled to flat arrays for vectorised text generation
# --------------------------------------------------------------------------------------------------
_FORM_PLAIN, _FORM_CAPITAL, _FORM_PERIOD, _FORM_COMMA = range(4)


class _Vocabulary:
    """All words in one array; segments (start, length) for every slot kind; templates as slot codes.

    A token is ``form * n_words + word``; ``strings`` holds every form of every word.
    """

    def __init__(self) -> None:
        self.categories: list[str] = []
        self.subcategories: list[str] = []
        sub_category, sub_share = [], []
        words: list[str] = []
        seg_start, seg_len = [], []

        def segment(items: list[str]) -> int:
            seg_start.append(len(words))
            seg_len.append(len(items))
            words.extend(items)
            return len(seg_start) - 1

        topic_segments = []
        for c, (cat, spec) in enumerate(TOPICS.items()):
            self.categories.append(cat)
            shared = [str.split(x) for x in spec["shared"]]
            subs = spec["subcategories"]
            total = sum(s[0] for s in subs.values())
            for sub, (share, *own) in subs.items():
                self.subcategories.append(sub)
                sub_category.append(c)
                sub_share.append(spec["weight"] * share / total)
                topic_segments.append([segment(str.split(own[k]) + shared[k]) for k in range(3)])
        if len(set(self.subcategories)) != len(self.subcategories):
            raise ValueError("subcategory names must be unique")
        self.sub_category = np.asarray(sub_category, dtype=np.int64)
        share = np.asarray(sub_share)
        self.sub_share = share / share.sum()
        self.topic_segment = np.asarray(topic_segments, dtype=np.int64)  # (subcategories, 3)

        self._general = {kind: segment(str.split(text)) for kind, text in GENERAL.items()}
        self._literal: dict[str, int] = {}
        self.title_templates = self._compile(TITLE_TEMPLATES, segment)
        self.sentence_templates = self._compile(SENTENCE_TEMPLATES, segment)

        self.seg_start = np.asarray(seg_start, dtype=np.int64)
        self.seg_len = np.asarray(seg_len, dtype=np.int64)
        self.n_words = len(words)
        capital = [w[:1].upper() + w[1:] for w in words]
        forms = (words, capital, [w + "." for w in words], [w + "," for w in words])
        self.strings = np.array([s for form in forms for s in form], dtype=object)

    def _compile(self, templates: tuple[str, ...], segment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes, forms, lengths): codes < 0 are topic slots -1-k, codes >= 0 are segment ids."""
        rows = []
        for template in templates:
            row = []
            for raw in template.split():
                form = _FORM_COMMA if raw.endswith(",") else _FORM_PLAIN
                slot = raw.rstrip(",")
                if slot in TOPIC_SLOTS:
                    code = -1 - TOPIC_SLOTS.index(slot)
                elif slot in self._general:
                    code = self._general[slot]
                else:
                    if slot not in self._literal:
                        self._literal[slot] = segment([slot])
                    code = self._literal[slot]
                row.append((code, form))
            rows.append(row)
        width = max(len(r) for r in rows)
        codes = np.zeros((len(rows), width), dtype=np.int64)
        forms = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            codes[i, :len(row)] = [c for c, _ in row]
            forms[i, :len(row)] = [f for _, f in row]
        return codes, forms, np.asarray([len(r) for r in rows], dtype=np.int64)

    def texts(self, rng: np.random.Generator, subcats: np.ndarray, n_sentences: np.ndarray, title: bool,
              title_case: np.ndarray | None = None) -> list[str]:
        """One text per document: ``n_sentences[d]`` template sentences about subcategory ``subcats[d]``."""
        codes, forms, lengths = self.title_templates if title else self.sentence_templates
        sent_doc = np.repeat(np.arange(len(subcats)), n_sentences)
        tpl = rng.integers(len(lengths), size=len(sent_doc))
        sent_len = lengths[tpl]
        tok_sent = np.repeat(np.arange(len(tpl)), sent_len)
        sent_start = np.cumsum(sent_len) - sent_len
        pos = np.arange(len(tok_sent)) - sent_start[tok_sent]
        code = codes[tpl[tok_sent], pos]
        form = forms[tpl[tok_sent], pos]
        topic = code < 0
        seg = code.copy()
        seg[topic] = self.topic_segment[subcats[sent_doc[tok_sent[topic]]], -1 - code[topic]]
        word = self.seg_start[seg] + (rng.random(len(seg)) * self.seg_len[seg]).astype(np.int64)

        first = pos == 0
        last = pos == sent_len[tok_sent] - 1
        form[first] = _FORM_CAPITAL
        if title:
            if title_case is not None:
                form[title_case[sent_doc[tok_sent]]] = _FORM_CAPITAL
        else:
            form[last] = _FORM_PERIOD
        tokens = self.strings[form * self.n_words + word].tolist()

        doc_len = np.bincount(sent_doc[tok_sent], minlength=len(subcats)) if len(tok_sent) else \
            np.zeros(len(subcats), dtype=np.int64)
        ends = np.cumsum(doc_len)
        return [" ".join(tokens[e - n:e]) for e, n in zip(ends.tolist(), doc_len.tolist())]


# --------------------------------------------------------------------------------------------------
# The world: news, users, impression schedule
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroundTruth:
    """The hidden preferences behind the clicks, for oracle baselines in tests and benchmarks.

    ``affinity[u, s]`` is how many times more than average user ``user_ids[u]`` clicks news of
    subcategory ``subcategories[s]``; a higher value means a shown news of that subcategory is more
    likely to be clicked.
    """

    user_ids: tuple[str, ...]
    subcategories: tuple[str, ...]
    affinity: np.ndarray

    def score(self, user_id: str, subcategory: str) -> float:
        """The affinity of a user (``U17``) for a subcategory (``football_nfl``)."""
        return float(self.affinity[int(user_id[1:]) - 1, self.subcategories.index(subcategory)])


def _sample_distinct(need: np.ndarray, draw, n_items: int, rng: np.random.Generator,
                     max_rounds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``need[g]`` distinct items for every group g, sampled without replacement.

    ``draw(owner, rng)`` samples one item (with replacement) per entry of ``owner``. Keeping the first
    new item of each draw sequence is exactly sequential sampling without replacement. Returns
    (owner, item), grouped by owner, in draw order within a group.
    """
    remaining = need.astype(np.int64).copy()
    owners, items = [], []
    seen = np.zeros(0, dtype=np.int64)
    for _ in range(max_rounds):
        groups = np.flatnonzero(remaining > 0)
        if not len(groups):
            break
        owner = np.repeat(groups, np.ceil(remaining[groups] * 1.3).astype(np.int64) + 2)
        item = draw(owner, rng)
        keys = owner * n_items + item
        _, first = np.unique(np.concatenate([seen, keys]), return_index=True)
        new = np.sort(first[first >= len(seen)] - len(seen))
        new_owner = owner[new]
        rank = np.arange(len(new)) - np.searchsorted(new_owner, new_owner, side="left")
        keep = new[rank < remaining[new_owner]]
        owners.append(owner[keep])
        items.append(item[keep])
        seen = np.concatenate([seen, keys[keep]])
        remaining -= np.bincount(owner[keep], minlength=len(remaining))
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    item = np.concatenate(items) if items else np.zeros(0, dtype=np.int64)
    order = np.argsort(owner, kind="stable")
    return owner[order], item[order]


def _flat_cdf(weights: np.ndarray) -> np.ndarray:
    """Row-wise CDFs shifted by the row index, so one searchsorted serves all rows."""
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    return (cdf + np.arange(len(weights))[:, None]).ravel()


class _World:
    """Everything that does not depend on the popularity exponent."""

    def __init__(self, vocab: _Vocabulary, users: int, seed: int, history_mean: float = 0.0) -> None:
        rng = np.random.default_rng([seed, _STREAM_WORLD])
        n_sub = len(vocab.subcategories)
        self.users = users
        self.n_news = n = max(MIN_NEWS, int(round(NEWS_PER_USER * users)))

        # News: ids in publish order (N1 is the oldest).
        self.subcat = rng.choice(n_sub, size=n, p=vocab.sub_share)
        span = (HISTORY_DAYS + TRAIN_DAYS + DEV_DAYS) * DAY
        self.publish = np.sort(rng.integers(0, span, size=n)) - HISTORY_DAYS * DAY  # s from train start
        self.log_rank = np.log(rng.permutation(n) + 1.0)  # popularity w = rank ** -a
        self.n_hist_news = int(np.searchsorted(self.publish, 0))

        # Users' interests.
        fav_count = 1 + rng.binomial(EXTRA_FAVOURITES_MAX, EXTRA_FAVOURITES_P, size=users)
        keys = np.log(vocab.sub_share)[None, :] + rng.gumbel(size=(users, n_sub))  # weighted, no repeats
        by_key = np.argsort(-keys, axis=1)
        split = rng.gamma(1.0, size=(users, 1 + EXTRA_FAVOURITES_MAX))
        split[np.arange(1 + EXTRA_FAVOURITES_MAX)[None, :] >= fav_count[:, None]] = 0.0
        split /= split.sum(axis=1, keepdims=True)
        rows = np.arange(users)[:, None]
        favourite = np.zeros((users, n_sub))
        favourite[rows, by_key[:, :1 + EXTRA_FAVOURITES_MAX]] = split
        fav_cat = np.zeros((users, len(vocab.categories)))
        np.add.at(fav_cat, (np.repeat(np.arange(users), 1 + EXTRA_FAVOURITES_MAX),
                            vocab.sub_category[by_key[:, :1 + EXTRA_FAVOURITES_MAX]].ravel()), split.ravel())
        in_cat = (fav_cat[:, vocab.sub_category] > 0) * vocab.sub_share[None, :]
        interest = (FAVOURITE_MASS * favourite
                    + CATEGORY_MASS * in_cat / in_cat.sum(axis=1, keepdims=True)
                    + BACKGROUND_MASS * vocab.sub_share[None, :])
        self.affinity = interest / vocab.sub_share[None, :]

        # Activity: history lengths and impression counts per user.
        # history_mean > 0 scales the calibrated lengths to that mean (before the caps), e.g. to ask how a method
        # fares on logs with longer or shorter user histories; the same draws, so only the lengths change
        scale = history_mean / (HISTORY_MEDIAN * np.exp(HISTORY_SIGMA ** 2 / 2)) if history_mean > 0 else 1.0
        hist = np.rint(HISTORY_MEDIAN * scale * np.exp(HISTORY_SIGMA * rng.standard_normal(users)))
        hist = np.clip(hist, 1, HISTORY_MAX).astype(np.int64)
        hist[rng.random(users) < EMPTY_HISTORY_SHARE] = 0
        self.hist_len = np.minimum(hist, self.n_hist_news // 2)
        self.history_head = min(HISTORY_HEAD, self.n_hist_news // 2)  # explicitly raced popular news
        n_train = np.minimum(rng.geometric(1.0 / TRAIN_IMPRESSIONS_MEAN, size=users), TRAIN_IMPRESSIONS_MAX)
        n_dev = rng.choice(len(DEV_IMPRESSIONS_P), size=users, p=DEV_IMPRESSIONS_P)

        # Impressions: train ones first, each split in time order.
        imp_user = np.concatenate([np.repeat(np.arange(users), n_train), np.repeat(np.arange(users), n_dev)])
        imp_time = np.concatenate([rng.integers(0, TRAIN_DAYS * DAY, size=int(n_train.sum())),
                                   rng.integers(TRAIN_DAYS * DAY, (TRAIN_DAYS + DEV_DAYS) * DAY,
                                                size=int(n_dev.sum()))])
        imp_dev = np.arange(len(imp_user)) >= n_train.sum()
        order = np.lexsort((imp_user, imp_time, imp_dev))
        self.imp_user, self.imp_time, self.imp_dev = imp_user[order], imp_time[order], imp_dev[order]

        # Candidates: distinct fresh news; they do not depend on popularity.
        pool_size = max(MIN_POOL, int(round(n / (HISTORY_DAYS + TRAIN_DAYS + DEV_DAYS) * FRESH_DAYS)))
        pool_end = np.searchsorted(self.publish, self.imp_time)  # news published before the impression
        pool = np.minimum(pool_size, pool_end)
        size = np.rint(IMPRESSION_MEDIAN * np.exp(IMPRESSION_SIGMA * rng.standard_normal(len(pool))))
        size = np.clip(size, IMPRESSION_MIN, np.minimum(IMPRESSION_MAX, pool // 2)).astype(np.int64)

        def draw_fresh(owner: np.ndarray, r: np.random.Generator) -> np.ndarray:
            reach = np.where(r.random(len(owner)) < OLD_SHOWN_SHARE, pool_end[owner], pool[owner])
            offset = (reach * r.random(len(owner)) ** RECENCY_POWER).astype(np.int64)
            return pool_end[owner] - 1 - offset

        imp_rng = np.random.default_rng([seed, _STREAM_IMPRESSIONS])
        parts = []
        for lo in range(0, len(size), IMPRESSION_CHUNK):  # blocks of impressions bound the memory
            block = np.zeros_like(size)
            block[lo:lo + IMPRESSION_CHUNK] = size[lo:lo + IMPRESSION_CHUNK]
            parts.append(_sample_distinct(block, draw_fresh, n, imp_rng))
        self.cand_imp, self.cand_news = (np.concatenate(x) for x in zip(*parts))
        cand_gumbel = imp_rng.gumbel(size=len(self.cand_imp))
        # Click key without popularity: log affinity + Gumbel noise (Gumbel-top-k sampling).
        self.cand_key = np.log(self.affinity[self.imp_user[self.cand_imp], self.subcat[self.cand_news]]) + cand_gumbel
        n_imp = len(self.imp_user)
        self.extra_clicks = imp_rng.poisson(EXTRA_CLICK_RATE * size)
        starts = np.searchsorted(self.cand_imp, np.arange(n_imp))
        noisy = imp_rng.random(n_imp) < NOISE_CLICK_SHARE
        noise_pos = starts + (imp_rng.random(n_imp) * np.bincount(self.cand_imp, minlength=n_imp)).astype(np.int64)
        self.cand_noise = np.zeros(len(self.cand_imp), dtype=bool)
        self.cand_noise[noise_pos[noisy]] = True


@dataclass
class _Clicks:
    """The outcome of one click simulation."""

    hist_user: np.ndarray   # history entries grouped by user, oldest first
    hist_news: np.ndarray
    cand_imp: np.ndarray    # candidates grouped by impression
    cand_news: np.ndarray
    cand_label: np.ndarray
    keep_imp: np.ndarray    # impressions kept (at least 2 candidates after removing already-read news)
    head_share: float


def _simulate(world: _World, exponent: float, seed: int, head_fraction: float) -> _Clicks:
    rng = np.random.default_rng([seed, _STREAM_CLICKS])
    n = world.n_news
    log_w = -exponent * world.log_rank

    hist_user, hist_news = _sample_histories(world, log_w, rng)
    lag = rng.exponential(HISTORY_CLICK_LAG_S, size=len(hist_news))
    click_time = np.minimum(world.publish[hist_news] + lag, -1.0)
    order = np.lexsort((click_time, hist_user))
    hist_user, hist_news = hist_user[order], hist_news[order]

    # Train impressions never show news already in the user's history; dev ones neither the train clicks.
    users = world.users
    cand_keys = world.imp_user[world.cand_imp] * n + world.cand_news
    cand_dev = world.imp_dev[world.cand_imp]
    hist_keys = np.sort(hist_user * n + hist_news)
    shown = np.ones(len(cand_keys), dtype=bool)
    train = np.flatnonzero(~cand_dev)
    shown[train] = ~_contains(hist_keys, cand_keys[train])
    labels = _choose_clicks(world, log_w, shown & ~cand_dev)
    read_keys = np.sort(np.concatenate([hist_keys, cand_keys[labels]]))
    dev = np.flatnonzero(cand_dev)
    shown[dev] = ~_contains(read_keys, cand_keys[dev])
    labels |= _choose_clicks(world, log_w, shown & cand_dev)

    n_imp = len(world.imp_user)
    keep_imp = np.bincount(world.cand_imp[shown], minlength=n_imp) >= IMPRESSION_MIN
    shown &= keep_imp[world.cand_imp]
    cand_imp, cand_news, cand_label = world.cand_imp[shown], world.cand_news[shown], labels[shown]

    # Click counts as in the real sample's README: history entries on every behaviors line + clicks.
    lines = np.bincount(world.imp_user[keep_imp], minlength=users)
    dev_lines = np.bincount(world.imp_user[keep_imp & world.imp_dev], minlength=users)
    counts = np.bincount(hist_news, weights=lines[hist_user], minlength=n)
    clicked = cand_label.astype(bool)
    train_clicked = clicked & ~world.imp_dev[cand_imp]
    counts += np.bincount(cand_news[clicked], minlength=n)
    read_in_train = np.unique(world.imp_user[cand_imp[train_clicked]] * n + cand_news[train_clicked])
    counts += np.bincount(read_in_train % n, weights=dev_lines[read_in_train // n], minlength=n)  # dev histories
    mentioned = np.zeros(n, dtype=bool)
    mentioned[cand_news] = True
    mentioned[hist_news[lines[hist_user] > 0]] = True
    head = _head_share(counts[mentioned], head_fraction)
    return _Clicks(hist_user, hist_news, cand_imp, cand_news, cand_label, keep_imp, head)


def _sample_histories(world: _World, log_w: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``hist_len[u]`` distinct news per user u, drawn without replacement with odds affinity * w.

    Exact weighted sampling without replacement is an exponential race: news i gets key E / rate_i
    (E ~ Exp(1)) and the smallest keys win. The HISTORY_HEAD most popular news get explicit keys (a
    users x HISTORY_HEAD matrix, in chunks). The remaining light tail is a Poisson process of
    with-replacement draws (subcategory by affinity * tail mass, then news by popularity), whose first
    arrival time per news is exactly its key; news not reached by the process have keys beyond its last
    arrival. So the smallest keys among explicit keys below that horizon and tail first arrivals are
    exact, and hold enough entries unless the tail repeated itself a lot, in which case we redraw.
    Returns (user, news) grouped by user, in key order.
    """
    n, n_hist, n_sub = world.n_news, world.n_hist_news, world.affinity.shape[1]
    w = np.exp(log_w[:n_hist])
    by_popularity = np.argsort(world.log_rank[:n_hist], kind="stable")
    head, tail = by_popularity[:world.history_head], np.sort(by_popularity[world.history_head:])
    head_rate_scale = w[head]
    head_sub = world.subcat[head]

    # Tail sampler: a subcategory per user row, then a news within it (CDFs normalised per subcategory).
    tail_sub = world.subcat[tail]
    sub_mass = np.bincount(tail_sub, weights=w[tail], minlength=n_sub)
    user_rate = world.affinity * sub_mass[None, :]
    tail_rate = user_rate.sum(axis=1)
    user_cdf = _flat_cdf(user_rate)
    by_sub = np.argsort(tail_sub, kind="stable")
    sub_sorted = tail_sub[by_sub]
    cum = np.cumsum(w[tail][by_sub] / sub_mass[sub_sorted])
    sub_first = np.searchsorted(sub_sorted, np.arange(n_sub), side="left")
    sub_last = np.searchsorted(sub_sorted, np.arange(n_sub), side="right") - 1
    sub_base = np.where(sub_first > 0, cum[np.maximum(sub_first - 1, 0)], 0.0)
    sub_total = cum[np.maximum(sub_last, 0)] - sub_base

    def race(users: np.ndarray, need: np.ndarray, events_per_entry: float) -> tuple[np.ndarray, ...]:
        owner = np.repeat(users, np.ceil(events_per_entry * need).astype(np.int64) + 5)
        sub = np.searchsorted(user_cdf, owner + rng.random(len(owner)), side="right") - owner * n_sub
        sub = np.minimum(sub, n_sub - 1)
        pick = np.searchsorted(cum, sub_base[sub] + rng.random(len(owner)) * sub_total[sub], side="right")
        item = tail[by_sub[np.clip(pick, sub_first[sub], sub_last[sub])]]
        clock = np.cumsum(rng.exponential(size=len(owner)))
        group_start = np.searchsorted(owner, owner, side="left")
        clock -= np.where(group_start > 0, clock[np.maximum(group_start - 1, 0)], 0.0)
        arrival = clock / tail_rate[owner]
        _, first = np.unique(owner * n + item, return_index=True)
        horizon = np.full(world.users, -np.inf)
        horizon[owner] = arrival  # the last arrival of each owner wins (owner is grouped)
        cand = [(owner[first], item[first], arrival[first])]
        for lo in range(0, len(users), HISTORY_CHUNK):
            chunk = users[lo:lo + HISTORY_CHUNK]
            keys = rng.exponential(size=(len(chunk), len(head)))
            keys /= world.affinity[chunk][:, head_sub] * head_rate_scale[None, :]
            row, col = np.nonzero(keys < horizon[chunk][:, None])
            cand.append((chunk[row], head[col], keys[row, col]))
        c_owner, c_item, c_key = (np.concatenate(x) for x in zip(*cand))
        order = np.lexsort((c_key, c_owner))
        c_owner, c_item = c_owner[order], c_item[order]
        rank = np.arange(len(order)) - np.searchsorted(c_owner, c_owner, side="left")
        keep = rank < world.hist_len[c_owner]
        return c_owner[keep], c_item[keep]

    chosen_user, chosen_news = race(np.flatnonzero(world.hist_len > 0), world.hist_len[world.hist_len > 0], 1.5)
    for events_per_entry in (4.0, 16.0):
        short = np.flatnonzero(np.bincount(chosen_user, minlength=world.users) < world.hist_len)
        if not len(short):
            break
        again_user, again_news = race(short, world.hist_len[short], events_per_entry)
        redone = np.isin(chosen_user, short)
        chosen_user = np.concatenate([chosen_user[~redone], again_user])
        chosen_news = np.concatenate([chosen_news[~redone], again_news])
    order = np.argsort(chosen_user, kind="stable")
    return chosen_user[order], chosen_news[order]


def _head_share(counts: np.ndarray, fraction: float) -> float:
    """Share of all clicks made by the top ``max(1, round(fraction * n))`` news."""
    k = max(1, int(round(fraction * len(counts))))
    total = counts.sum()
    return float(np.sort(counts)[::-1][:k].sum() / total) if total else 0.0


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Membership of ``keys`` in the sorted array ``sorted_keys``."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _choose_clicks(world: _World, log_w: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Labels for the active candidates: 1 + Poisson clicks per impression (never all), drawn by
    Gumbel-top-k on log(affinity) + 0.5 log(w); noise candidates are clicked first."""
    idx = np.flatnonzero(active)
    imp = world.cand_imp[idx]
    key = world.cand_key[idx] + IMPRESSION_POPULARITY_POWER * log_w[world.cand_news[idx]]
    key = np.where(world.cand_noise[idx], _KEY_BOUND, np.clip(key, -_KEY_BOUND, _KEY_BOUND))
    order = np.argsort(imp * (4 * _KEY_BOUND) - key)  # by impression, then by key descending
    imp_sorted = imp[order]
    rank = np.arange(len(order)) - np.searchsorted(imp_sorted, imp_sorted, side="left")
    size = np.bincount(imp, minlength=len(world.imp_user))
    n_clicks = np.minimum(1 + world.extra_clicks, size - 1)
    labels = np.zeros(len(world.cand_imp), dtype=bool)
    labels[idx[order[rank < n_clicks[imp_sorted]]]] = True
    return labels


def _calibrate(world: _World, seed: int, head_share: float, head_fraction: float) -> tuple[float, _Clicks]:
    """Popularity exponent whose simulated click log gives the wanted head share (false position).

    The share rises with the exponent; every evaluation reuses the same random streams, so the search
    sees a nearly smooth function. When the target is out of reach the nearest end is returned.
    """
    lo, hi = 0.0, MAX_POPULARITY_EXPONENT
    at_lo, at_hi = _simulate(world, lo, seed, head_fraction), _simulate(world, hi, seed, head_fraction)
    if at_lo.head_share >= head_share:
        return lo, at_lo
    if at_hi.head_share <= head_share:
        return hi, at_hi
    f_lo, f_hi = at_lo.head_share - head_share, at_hi.head_share - head_share
    best = (abs(f_lo), lo, at_lo) if abs(f_lo) < abs(f_hi) else (abs(f_hi), hi, at_hi)
    side = 0
    for _ in range(CALIBRATION_MAX_STEPS):
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        result = _simulate(world, mid, seed, head_fraction)
        f_mid = result.head_share - head_share
        if abs(f_mid) < best[0]:
            best = (abs(f_mid), mid, result)
        if abs(f_mid) <= CALIBRATION_TOLERANCE:
            break
        if f_mid > 0:  # Illinois variant: halve the stale end's value when one side keeps moving
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2
            side = 1
        else:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2
            side = -1
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _mind_time(seconds: int) -> str:
    t = TRAIN_START + timedelta(seconds=int(seconds))
    hour = t.hour % 12 or 12
    return f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d}:{t.second:02d} {'AM' if t.hour < 12 else 'PM'}"


def _write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def generate(out_dir, users: int = 2000, seed: int = 0, head_share: float = 0.6, head_fraction: float = 0.1,
             return_truth: bool = False, history_mean: float = 0.0):
    """Write a synthetic MIND-format data set (train and dev) to ``out_dir`` and return its statistics.

    ``history_mean`` > 0: user histories of about that mean length instead of the calibrated ~32 (capped as
    always by the news published before the log; the summary says what came out). Returns the summary dict, or
    ``(summary, GroundTruth)`` when ``return_truth`` is true. Any existing ``out_dir`` is replaced only once the new
    data set is complete.
    """
    if history_mean < 0:
        raise ValueError("history_mean must be >= 0 (0: the calibrated lengths)")
    if users < 1:
        raise ValueError("users must be at least 1")
    if not (0 < head_fraction < 1 and 0 < head_share < 1):
        raise ValueError("head_fraction and head_share must lie strictly between 0 and 1")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    vocab = _Vocabulary()
    world = _World(vocab, users, seed, history_mean)
    exponent, clicks = _calibrate(world, seed, head_share, head_fraction)
    if abs(clicks.head_share - head_share) > HEAD_SHARE_WARN:
        # Histories never repeat a news, so a tiny head cannot take most clicks in a small world.
        warnings.warn(f"the top {head_fraction:.1%} of news get {clicks.head_share:.1%} of clicks, not "
                      f"{head_share:.1%}: out of reach with {users} users", stacklevel=2)

    # Behaviors lines (impression ids restart at 1 in each split, as in MIND).
    n = world.n_news
    news_ids = np.array([f"N{i + 1}" for i in range(n)], dtype=object)
    tokens = (np.array([f"N{i + 1}-0" for i in range(n)], dtype=object),
              np.array([f"N{i + 1}-1" for i in range(n)], dtype=object))
    hist_bounds = np.searchsorted(clicks.hist_user, np.arange(users + 1))
    hist_ids = news_ids[clicks.hist_news].tolist()
    cand_bounds = np.searchsorted(clicks.cand_imp, np.arange(len(world.imp_user) + 1))
    cand_tokens = np.where(clicks.cand_label, tokens[1][clicks.cand_news], tokens[0][clicks.cand_news]).tolist()
    train_clicks: list[list[int]] = [[] for _ in range(users)]
    lines = {"train": [], "dev": []}
    used = {"train": np.zeros(n, dtype=bool), "dev": np.zeros(n, dtype=bool)}
    history = [clicks.hist_news[hist_bounds[u]:hist_bounds[u + 1]] for u in range(users)]
    history_text = {"train": [" ".join(hist_ids[hist_bounds[u]:hist_bounds[u + 1]]) for u in range(users)]}
    kept = np.flatnonzero(clicks.keep_imp)
    for split in ("train", "dev"):
        if split == "dev":  # the dev history adds the train clicks, oldest first, each once
            history = [np.concatenate([history[u], np.array(list(dict.fromkeys(train_clicks[u])), dtype=np.int64)])
                       for u in range(users)]
            history_text["dev"] = [" ".join(news_ids[h].tolist()) for h in history]
        for j in kept[world.imp_dev[kept] == (split == "dev")].tolist():
            user = int(world.imp_user[j])
            a, b = cand_bounds[j], cand_bounds[j + 1]
            if split == "train":
                train_clicks[user].extend(clicks.cand_news[a:b][clicks.cand_label[a:b]].tolist())
            lines[split].append(f"{len(lines[split]) + 1}\tU{user + 1}\t{_mind_time(world.imp_time[j])}\t"
                                f"{history_text[split][user]}\t{' '.join(cand_tokens[a:b])}\n")
            used[split][clicks.cand_news[a:b]] = True
            used[split][history[user]] = True

    # Text.
    text_rng = np.random.default_rng([seed, _STREAM_TEXT])
    title_case = text_rng.random(n) < TITLE_CASE_SHARE
    titles = vocab.texts(text_rng, world.subcat, np.ones(n, dtype=np.int64), title=True, title_case=title_case)
    mean_sentence = float(vocab.sentence_templates[2].mean())
    abstract_words = ABSTRACT_MEDIAN * np.exp(ABSTRACT_SIGMA * text_rng.standard_normal(n))
    abstract_sents = np.maximum(1, np.rint(np.minimum(abstract_words, ABSTRACT_MAX) / mean_sentence)).astype(np.int64)
    abstract_sents[text_rng.random(n) < ABSTRACT_EMPTY_SHARE] = 0
    abstracts = vocab.texts(text_rng, world.subcat, abstract_sents, title=False)
    body_words = np.minimum(BODY_MAX, BODY_MEDIAN * np.exp(BODY_SIGMA * text_rng.standard_normal(n)))
    body_sents = np.maximum(1, np.rint(body_words / mean_sentence)).astype(np.int64)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        body_words = _write(tmp, vocab, world, lines, used, titles, abstracts, body_sents, seed)
        summary = _summary(world, clicks, exponent, head_share, head_fraction, titles, abstracts, used,
                           body_words, seed)
        (tmp / "COMPLETE").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if return_truth:
        truth = GroundTruth(tuple(f"U{u + 1}" for u in range(users)), tuple(vocab.subcategories), world.affinity)
        return summary, truth
    return summary


def _write(tmp: Path, vocab: _Vocabulary, world: _World, lines: dict, used: dict, titles: list[str],
           abstracts: list[str], body_sents: np.ndarray, seed: int) -> list[int]:
    """All data files of both splits into ``tmp``; bodies are generated chunk by chunk while writing.

    Returns the word counts of the bodies written."""
    for split in ("train", "dev"):
        (tmp / split).mkdir(parents=True)
        _write_lines(tmp / split / "behaviors.tsv", lines[split])
        _write_lines(tmp / split / "news.tsv", (
            f"N{i + 1}\t{vocab.categories[vocab.sub_category[world.subcat[i]]]}\t"
            f"{vocab.subcategories[world.subcat[i]]}\t{titles[i]}\t{abstracts[i]}\t"
            f"https://example.invalid/news/N{i + 1}.html\t[]\t[]\n" for i in np.flatnonzero(used[split]).tolist()))

    n = world.n_news
    body_rng = np.random.default_rng([seed, _STREAM_BODIES])
    body_words = []
    with open(tmp / "train" / "bodies.tsv", "w", encoding="utf-8", newline="\n") as f_train, \
            open(tmp / "dev" / "bodies.tsv", "w", encoding="utf-8", newline="\n") as f_dev:
        for lo in range(0, n, BODY_CHUNK):
            hi = min(n, lo + BODY_CHUNK)
            bodies = vocab.texts(body_rng, world.subcat[lo:hi], body_sents[lo:hi], title=False)
            for i, body in enumerate(bodies, start=lo):
                if used["train"][i] or used["dev"][i]:
                    body_words.append(body.count(" ") + 1)
                row = f"N{i + 1}\t{body}\n"
                if used["train"][i]:
                    f_train.write(row)
                if used["dev"][i]:
                    f_dev.write(row)
    return body_words


def _summary(world: _World, clicks: _Clicks, exponent: float, head_share: float, head_fraction: float,
             titles: list[str], abstracts: list[str], used: dict, body_words: list[int], seed: int) -> dict:
    """Statistics of the train split (the one the real sample comes from) and the popularity fit."""
    train_imp = np.flatnonzero(clicks.keep_imp & ~world.imp_dev)
    hist_len = np.bincount(clicks.hist_user, minlength=world.users)[world.imp_user[train_imp]]
    is_train = ~world.imp_dev[clicks.cand_imp]
    sizes = np.bincount(clicks.cand_imp[is_train], minlength=len(world.imp_user))[train_imp]
    mentioned = used["train"] | used["dev"]
    title_words = np.array([len(titles[i].split()) for i in np.flatnonzero(mentioned)])
    abstract_words = np.array([len(abstracts[i].split()) for i in np.flatnonzero(mentioned)])
    return {
        "users": world.users,
        "seed": seed,
        "news": int(mentioned.sum()),
        "train_news": int(used["train"].sum()),
        "dev_news": int(used["dev"].sum()),
        "train_impressions": int(len(train_imp)),
        "dev_impressions": int((clicks.keep_imp & world.imp_dev).sum()),
        "history_mean": round(float(hist_len.mean()), 2),
        "history_median": float(np.median(hist_len)),
        "history_p99": round(float(np.percentile(hist_len, 99)), 1),
        "history_empty_share": round(float((hist_len == 0).mean()), 4),
        "impression_size_mean": round(float(sizes.mean()), 2),
        "impression_size_median": float(np.median(sizes)),
        "ctr": round(float(clicks.cand_label[is_train].mean()), 4),
        "title_words_mean": round(float(title_words.mean()), 2),
        "abstract_words_mean": round(float(abstract_words.mean()), 2),
        "abstract_empty_share": round(float((abstract_words == 0).mean()), 4),
        "body_words_median": float(np.median(body_words)),
        "head_fraction": head_fraction,
        "head_share_target": head_share,
        "head_share": round(clicks.head_share, 4),
        "popularity_exponent": round(float(exponent), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedyrec.data.synthetic",
                                     description="Write the synthetic MIND-format data set (train and dev).")
    parser.add_argument("--out", required=True, help="output directory (replaced when complete)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-share", type=float, default=0.6, help="click share of the most popular news")
    parser.add_argument("--head-fraction", type=float, default=0.1, help="... this fraction of the news")
    parser.add_argument("--history-mean", type=float, default=0.0,
                        help="mean user history length (0: the calibrated ~32 of the real MIND slice)")
    args = parser.parse_args(argv)
    summary = generate(args.out, users=args.users, seed=args.seed, head_share=args.head_share,
                       head_fraction=args.head_fraction, history_mean=args.history_mean)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
