"""The synthetic MIND-format data set: formats, closure, realism statistics, determinism, learnability.

The files are parsed here with small independent code (no speedyrec readers), so a generator bug
cannot hide behind a matching reader bug.
"""
import math
import re
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from speedyrec.data.synthetic import generate

USERS = 1500
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
TOKEN = re.compile(r"N\d+-[01]")
NEWS_ID = re.compile(r"N\d+")
SPLITS = ("train", "dev")


def read_news(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        cols = line.split("\t")
        assert len(cols) == 8, line[:200]
        assert NEWS_ID.fullmatch(cols[0]) and cols[0] not in rows
        assert cols[5] == f"https://example.invalid/news/{cols[0]}.html"
        assert cols[6] == cols[7] == "[]"
        assert cols[3].strip()  # every news has a title
        rows[cols[0]] = cols
    return rows


def read_behaviors(path: Path) -> list[tuple]:
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        cols = line.split("\t")
        assert len(cols) == 5, line[:200]
        imp_id, user, when, history, impressions = cols
        history_ids = history.split(" ") if history else []
        assert all(NEWS_ID.fullmatch(h) for h in history_ids)
        tokens = impressions.split(" ")
        assert all(TOKEN.fullmatch(t) for t in tokens), impressions[:200]
        labels = [int(t[-1]) for t in tokens]
        rows.append((int(imp_id), user, datetime.strptime(when, TIME_FORMAT), when, history_ids,
                     [t[:-2] for t in tokens], labels))
    return rows


def read_split(root: Path, split: str):
    news = read_news(root / split / "news.tsv")
    behaviors = read_behaviors(root / split / "behaviors.tsv")
    bodies = {}
    for line in (root / split / "bodies.tsv").read_text(encoding="utf-8").split("\n")[:-1]:
        cols = line.split("\t")
        assert len(cols) == 2
        bodies[cols[0]] = cols[1]
    return news, behaviors, bodies


def click_counts(splits) -> Counter:
    """History entries of every behaviors line plus clicks, over all news the behaviors mention."""
    counts = Counter()
    for _, behaviors, _ in splits.values():
        for row in behaviors:
            counts.update(row[4])
            counts.update(c for c, label in zip(row[5], row[6]) if label)
            for c in row[5]:
                counts[c] += 0
    return counts


def head_share(counts: Counter, fraction: float) -> float:
    values = sorted(counts.values(), reverse=True)
    k = max(1, round(fraction * len(values)))
    return sum(values[:k]) / sum(values)


def mean_auc(behaviors, score) -> float:
    """MIND's AUC: the mean over impressions of the per-impression ROC AUC (ties count one half)."""
    aucs = []
    for row in behaviors:
        labels = np.asarray(row[6])
        s = np.asarray([score(row[1], c) for c in row[5]], dtype=float)
        pos, neg = s[labels == 1], s[labels == 0]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        aucs.append(wins / (len(pos) * len(neg)))
    return float(np.mean(aucs))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    summary, truth = generate(root, users=USERS, seed=0, return_truth=True)
    splits = {s: read_split(root, s) for s in SPLITS}
    return root, summary, truth, splits


def test_layout_and_marker(dataset):
    root, summary, _, _ = dataset
    for split in SPLITS:
        for name in ("news.tsv", "behaviors.tsv", "bodies.tsv"):
            raw = (root / split / name).read_bytes()
            assert raw.endswith(b"\n") and b"\r" not in raw
    assert (root / "COMPLETE").is_file()
    assert not list(root.parent.glob(".data.*"))  # no temporary directory left behind
    assert summary["users"] == USERS


def test_ids_closed_and_consistent(dataset):
    _, _, _, splits = dataset
    for split in SPLITS:
        news, behaviors, bodies = splits[split]
        mentioned = {n for row in behaviors for n in row[4] + row[5]}
        assert mentioned <= set(news), split
        assert mentioned <= set(bodies), split
        assert set(news) == set(bodies) == mentioned  # the news file holds exactly the news used
        assert [row[0] for row in behaviors] == list(range(1, len(behaviors) + 1))
        for row in behaviors:
            assert len(set(row[5])) == len(row[5]) and sum(row[6]) >= 1 and sum(row[6]) < len(row[6])
            assert re.fullmatch(r"U\d+", row[1])
            assert not row[3].startswith("0") and " 0" not in row[3]  # no zero padding of month/day/hour
    train_news, dev_news = splits["train"][0], splits["dev"][0]
    for news_id in set(train_news) & set(dev_news):
        assert train_news[news_id] == dev_news[news_id]
        assert splits["train"][2][news_id] == splits["dev"][2][news_id]
    assert set(dev_news) - set(train_news), "dev should show news that train never mentions"


def test_time_and_histories(dataset):
    _, _, _, splits = dataset
    train, dev = splits["train"][1], splits["dev"][1]
    assert max(row[2] for row in train) < min(row[2] for row in dev)
    user_history = {}
    for row in train:
        assert user_history.setdefault(row[1], row[4]) == row[4]  # one history per user in train
    train_clicks = {}
    for row in sorted(train, key=lambda r: r[2]):
        train_clicks.setdefault(row[1], []).extend(c for c, label in zip(row[5], row[6]) if label)
    for row in dev:
        history = user_history.get(row[1], [])
        assert row[4][:len(history)] == history
        assert row[4][len(history):] == list(dict.fromkeys(train_clicks.get(row[1], [])))
    users_train = {row[1] for row in train}
    assert len(train) / len(users_train) == pytest.approx(3.2, abs=0.5)
    assert 0.55 <= len({row[1] for row in dev}) / USERS <= 0.85


def test_statistics_like_mind(dataset):
    _, summary, _, splits = dataset
    news, behaviors, bodies = splits["train"]
    hist = np.array([len(row[4]) for row in behaviors])
    assert 25 <= hist.mean() <= 40
    assert 13 <= np.median(hist) <= 24
    assert 120 <= np.percentile(hist, 99) <= 300
    assert 0.005 <= (hist == 0).mean() <= 0.05
    sizes = np.array([len(row[5]) for row in behaviors])
    assert 30 <= sizes.mean() <= 46
    assert sizes.min() >= 2 and sizes.max() > 100 and np.percentile(sizes, 10) < 10
    ctr = sum(sum(row[6]) for row in behaviors) / sizes.sum()
    assert 0.025 <= ctr <= 0.06
    titles = np.array([len(row[3].split()) for row in news.values()])
    abstracts = np.array([len(row[4].split()) for row in news.values()])
    assert 8 <= titles.mean() <= 14
    assert 25 <= abstracts.mean() <= 45 and 0.01 <= (abstracts == 0).mean() <= 0.1
    body_words = np.array([len(b.split()) for b in bodies.values()])
    assert np.median(body_words) >= 200 and body_words.max() > 2 * np.median(body_words)
    share = head_share(click_counts(splits), 0.1)
    assert 0.5 <= share <= 0.7
    assert share == pytest.approx(summary["head_share"], abs=1e-3)  # the summary counts like we do
    assert summary["history_mean"] == pytest.approx(hist.mean(), abs=0.01)
    assert summary["ctr"] == pytest.approx(ctr, abs=1e-4)


def test_text_follows_topics(dataset):
    _, _, _, splits = dataset
    news = splits["train"][0]
    words_by_sub: dict[str, Counter] = {}
    for row in news.values():
        words_by_sub.setdefault(row[2], Counter()).update(w.lower().strip(".,:") for w in row[3].split())
    nfl, recipes = words_by_sub["football_nfl"], words_by_sub["recipes"]
    assert nfl["quarterback"] > 0 and recipes["quarterback"] == 0
    assert recipes["garlic"] > 0 and nfl["garlic"] == 0
    assert len(words_by_sub) >= 40


def test_interest_predicts_dev_clicks(dataset):
    _, _, truth, splits = dataset
    dev_news, dev, _ = splits["dev"]
    subcategory = {n: row[2] for n, row in dev_news.items()}
    oracle = mean_auc(dev, lambda user, n: truth.score(user, subcategory[n]))
    rng = np.random.default_rng(1)
    random = mean_auc(dev, lambda user, n: rng.random())
    assert oracle >= 0.7
    assert abs(random - 0.5) < 0.03


def test_titles_alone_predict_dev_clicks(dataset):
    """A bag-of-words reader (tf-idf of the user's history titles vs the candidate title) beats random."""
    _, _, _, splits = dataset
    news = {**splits["train"][0], **splits["dev"][0]}
    words = {n: [w.lower().strip(".,:") for w in row[3].split()] for n, row in news.items()}
    df = Counter(w for ws in words.values() for w in set(ws))
    idf = {w: math.log(len(words) / c) for w, c in df.items()}

    def tfidf(ws):
        v = Counter()
        for w in ws:
            v[w] += idf[w]
        return v

    profiles = {}
    for row in splits["dev"][1]:
        if row[1] not in profiles:
            profiles[row[1]] = sum((tfidf(words[h]) for h in row[4]), Counter())

    def score(user, n):
        v = tfidf(words[n])
        return sum(profiles[user][w] * x for w, x in v.items()) / math.sqrt(sum(x * x for x in v.values()))

    assert mean_auc(splits["dev"][1], score) >= 0.62


def test_head_share_calibrates_to_speedyfeed_setting(tmp_path):
    # Histories never repeat a news, so the top 1% needs enough news (users) to take 60% of the clicks.
    summary = generate(tmp_path / "d", users=2000, seed=3, head_share=0.6, head_fraction=0.01)
    splits = {s: read_split(tmp_path / "d", s) for s in SPLITS}
    share = head_share(click_counts(splits), 0.01)
    assert 0.5 <= share <= 0.7
    assert share == pytest.approx(summary["head_share"], abs=1e-3)


def test_deterministic_per_seed(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    generate(tmp_path / "a", users=300, seed=7)
    generate(tmp_path / "b", users=300, seed=7)
    generate(tmp_path / "c", users=300, seed=8)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k != "COMPLETE")


def test_replaces_existing_directory(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    generate(out, users=50, seed=1)
    assert not (out / "stale.txt").exists() and (out / "COMPLETE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_failed_generation_keeps_previous_data_set(tmp_path, monkeypatch):
    from speedyrec.data import synthetic

    out = tmp_path / "d"
    generate(out, users=50, seed=1)
    before = (out / "train" / "behaviors.tsv").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_summary", crash)
    with pytest.raises(OSError):
        generate(out, users=60, seed=2)
    assert (out / "train" / "behaviors.tsv").read_bytes() == before and (out / "COMPLETE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the temporary directory is gone


def test_history_mean_scales_the_histories_and_changes_nothing_else_by_default(tmp_path):
    """data.synthetic_history_mean asks for histories of about that mean length (the where-it-pays sweep); 0 is
    the calibrated default, byte for byte."""
    def mean_history(root: Path) -> float:
        _, rows, _ = read_split(root, "train")
        per_user = {}
        for r in rows:
            per_user.setdefault(r[1], len(r[4]))  # every train line of a user carries the same history
        return float(np.mean(list(per_user.values())))

    generate(tmp_path / "default", users=400, seed=5)
    generate(tmp_path / "zero", users=400, seed=5, history_mean=0.0)
    assert (tmp_path / "default" / "train" / "behaviors.tsv").read_bytes() == \
        (tmp_path / "zero" / "train" / "behaviors.tsv").read_bytes()
    short, long = tmp_path / "short", tmp_path / "long"
    generate(short, users=400, seed=5, history_mean=10)
    generate(long, users=400, seed=5, history_mean=100)
    m_short, m_default, m_long = mean_history(short), mean_history(tmp_path / "default"), mean_history(long)
    assert 7 <= m_short <= 13 and 70 <= m_long <= 130 and m_short < m_default < m_long
    with pytest.raises(ValueError, match="history_mean"):
        generate(tmp_path / "bad", users=10, seed=5, history_mean=-1)


# sha256 over the file names and bytes of generate()'s default data set (2,000 users, seed 0), pinned when the
# vocabulary and templates moved from code to synthetic_vocabulary.json: the move changed no byte
DEFAULT_DATASET_SHA256 = "247a27f4fcb79b0b92075ec51635abe168b67cdd8f80cc0b413ef11840db0fd6"


def test_the_default_data_set_is_byte_for_byte_what_it_was(tmp_path):
    import hashlib

    out = tmp_path / "default"
    generate(out)
    h = hashlib.sha256()
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(out)).encode())
        h.update(f.read_bytes())
    assert h.hexdigest() == DEFAULT_DATASET_SHA256
