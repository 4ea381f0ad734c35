"""MIND's leaderboard end to end, on the real sample (impression ids not sequential, times not sorted): the
prediction file answers the behaviors file line by line (its ids, its order, a rank for every listed candidate),
the label-less test split is predicted, and prediction.txt scored against truth.txt by the leaderboard's own
definitions (written here, independently of speedyrec.eval.metrics) gives the run's metrics."""
from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import tiny_overrides
from speedyrec.data.behaviors import NO_LABEL, Listing, parse_mind_time
from speedyrec.data.ragged import Ragged
from speedyrec.export import listed_ranks
from speedyrec.export import main as export_main
from speedyrec.train import main as train_main

TRAIN_LINES = 4000  # of the sample's 5,000: the rest is dev, and (labels stripped) test


def leaderboard(prediction: list[str], truth: list[str], keep=None) -> dict:
    """MIND's published scoring of a submission: each line's candidates scored 1 / rank; per impression AUC,
    MRR = sum(y / rank) / sum(y), nDCG@5 and @10 with gains 2^y - 1 and discounts log2(position + 1); the mean over
    impressions. ``keep(impression id) -> bool mask`` scores only some candidates of each line. Impressions with
    one class only (no AUC) are left out, as speedyrec's evaluation does."""
    def dcg(y_sorted, k):
        y = y_sorted[:k]
        return float(np.sum((2.0 ** y - 1) / np.log2(np.arange(2, len(y) + 2))))

    sums, n = np.zeros(4), 0
    for p, t in zip(prediction, truth):
        pid, ranks = p.split(" ")
        tid, labels = t.split(" ")
        assert pid == tid
        rank, y = np.array(json.loads(ranks), dtype=float), np.array(json.loads(labels), dtype=float)
        assert len(rank) == len(y)
        if keep is not None:
            m = keep(pid)
            rank, y = rank[m], y[m]
        if len(y) == 0 or y.min() == y.max():
            continue
        score = 1.0 / rank
        by_score = y[np.argsort(-score, kind="stable")]
        ideal = np.sort(y)[::-1]
        sums += [roc_auc_score(y, score), np.sum(by_score / np.arange(1, len(y) + 1)) / y.sum(),
                 dcg(by_score, 5) / dcg(ideal, 5), dcg(by_score, 10) / dcg(ideal, 10)]
        n += 1
    return dict(zip(("auc", "mrr", "ndcg5", "ndcg10"), sums / n))


def _lines(path):
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def mind_splits(mind_sample, tmp_path_factory):
    """train/ (the sample's first 4,000 lines), dev/ (the other 1,000) and test/ (the same 1,000 without labels,
    its news file holding three more news, candidates the others' news file lacks), each with its news.tsv."""
    lines = _lines(mind_sample / "behaviors.tsv")
    news_rows = _lines(mind_sample / "news.tsv")
    known = {r.split("\t")[0] for r in news_rows}
    root = tmp_path_factory.mktemp("mind_splits")
    dev = lines[TRAIN_LINES:]
    unlabelled = [re.sub(r"-[01](?=\s|$)", "", line) for line in dev]
    missing = sorted({tok for line in unlabelled for tok in line.split("\t")[4].split()} - known)[:3]
    extra = [f"{i}\tnews\tworld\tan added story number {k} about the world\tits abstract\t\t[]\t[]"
             for k, i in enumerate(missing)]
    for name, rows, news in (("train", lines[:TRAIN_LINES], news_rows), ("dev", dev, news_rows),
                             ("test", unlabelled, news_rows + extra)):
        d = root / name
        d.mkdir()
        (d / "behaviors.tsv").write_text("\n".join(rows) + "\n")
        (d / "news.tsv").write_text("\n".join(news) + "\n")
    return root, missing, known


@pytest.fixture(scope="module")
def trained(mind_splits, tmp_path_factory, cache_dir):
    root, _, _ = mind_splits
    run = tmp_path_factory.mktemp("lb") / "run"
    assert train_main(tiny_overrides(run, cache_dir, "data.format=mind", f"data.dir={root}", "data.title_tokens=16",
                                     "train.max_steps=2", "eval.max_impressions=0", "train.amp=off")) == 0
    return run


def test_the_sample_is_what_these_tests_need(mind_splits):
    """Preconditions that make the order tests able to fail: the dev lines' ids are not sequential and their
    times not sorted, and many candidates are missing from the news file."""
    root, missing, known = mind_splits
    lines = _lines(root / "dev" / "behaviors.tsv")
    ids = [int(line.split("\t")[0]) for line in lines]
    times = [parse_mind_time(line.split("\t")[2]) for line in lines]
    assert ids != sorted(ids) and times != sorted(times)
    assert len(missing) == 3


def test_dev_prediction_answers_the_file_and_scores_as_the_run(trained, mind_splits):
    root, _, known = mind_splits
    assert export_main([str(trained)]) == 0
    out = trained / "export"
    s = json.loads((out / "export.json").read_text())
    lines = _lines(root / "dev" / "behaviors.tsv")
    pred, truth = _lines(out / "prediction.txt"), _lines(out / "truth.txt")
    # the file's ids in the file's order, one rank per listed candidate, a permutation of 1..n
    assert [p.split(" ")[0] for p in pred] == [line.split("\t")[0] for line in lines]
    for p, line in zip(pred, lines):
        ranks = json.loads(p.split(" ")[1])
        assert sorted(ranks) == list(range(1, len(line.split("\t")[4].split()) + 1))
    assert truth == [f"{line.split(chr(9))[0]} [{','.join(t[-1] for t in line.split(chr(9))[4].split())}]"
                     for line in lines]
    with zipfile.ZipFile(out / "prediction.zip") as z:
        assert z.namelist() == ["prediction.txt"] and z.read("prediction.txt").decode().splitlines() == pred
    listed = sum(len(line.split("\t")[4].split()) for line in lines)
    unknown = sum(t.rsplit("-", 1)[0] not in known for line in lines for t in line.split("\t")[4].split())
    assert s["candidates_listed"] == listed and s["candidates_unknown_news"] == unknown > 0
    # scored by the leaderboard's definitions: over the known candidates, the run's own metrics; over every listed
    # candidate (the unknown ones ranked last), export.json's leaderboard_metrics
    cands = {line.split("\t")[0]: [t.rsplit("-", 1)[0] for t in line.split("\t")[4].split()] for line in lines}
    on_known = leaderboard(pred, truth, keep=lambda i: np.array([c in known for c in cands[i]]))
    evaluated = json.loads((trained / "metrics.json").read_text())
    for k in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert on_known[k] == pytest.approx(evaluated[k], abs=1e-6), k
        assert s["dev_metrics"][k] == pytest.approx(evaluated[k], abs=1e-6), k
    every = leaderboard(pred, truth)
    for k in every:
        assert s["leaderboard_metrics"][k] == pytest.approx(every[k], abs=1e-6), k
    users = [line.split("\t")[1] for line in lines]
    assert [r.split("\t") for r in _lines(out / "impressions.txt")] == [[i, u] for i, u in
                                                                        zip(cands, users)]


def test_the_label_less_test_split_is_predicted_in_its_order_and_agrees_with_dev(trained, mind_splits):
    root, missing, _ = mind_splits
    dev_out, test_out = trained / "export_dev", trained / "export_test"
    assert export_main([str(trained), "--out", str(dev_out)]) == 0
    assert export_main([str(trained), "--split", "test", "--out", str(test_out)]) == 0
    s = json.loads((test_out / "export.json").read_text())
    assert s["split"] == "test" and not s["labelled"] and "dev_metrics" not in s
    assert not (test_out / "truth.txt").exists()
    assert s["news_added_by_split"] == 3
    lines = _lines(root / "test" / "behaviors.tsv")
    pred = _lines(test_out / "prediction.txt")
    assert [p.split(" ")[0] for p in pred] == [line.split("\t")[0] for line in lines]
    dev = dict(p.split(" ") for p in _lines(dev_out / "prediction.txt"))
    same = differ = 0
    for p, line in zip(pred, lines):
        i, ranks = p.split(" ")
        listed = line.split("\t")[4].split()
        assert len(json.loads(ranks)) == len(listed)
        if set(listed) & set(missing):  # a candidate only the test news file has: scored there, last in dev
            differ += 1
            continue
        assert ranks == dev[i], i
        same += 1
    assert same > 900 and differ >= 1


def test_export_on_two_ranks_writes_what_one_process_writes(trained, tmp_path):
    """torchrun export: each rank encodes a share of the news, rank 0 writes the same files as one process."""
    import subprocess
    import sys
    from pathlib import Path

    from test_resume import env

    one, two = tmp_path / "one", tmp_path / "two"
    assert export_main([str(trained), "--out", str(one)]) == 0
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*launcher, "--standalone", "--nproc_per_node=2", "-m", "speedyrec.export", str(trained),
                           "--out", str(two)], env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(two / "news_vectors.npy"), np.load(one / "news_vectors.npy"), atol=1e-5)
    np.testing.assert_allclose(np.load(two / "user_vectors.npy"), np.load(one / "user_vectors.npy"), atol=1e-5)
    a, b = _lines(one / "prediction.txt"), _lines(two / "prediction.txt")
    assert [x.split(" ")[0] for x in a] == [x.split(" ")[0] for x in b]
    assert sum(x == y for x, y in zip(a, b)) >= 0.99 * len(a)  # ranks equal but where two scores are within 1e-5
    assert (two / "truth.txt").read_text() == (one / "truth.txt").read_text()


def test_a_test_split_is_required_and_named(trained, mind_sample, tmp_path):
    """A data.dir without a test folder: --split test says which folders it looked for."""
    from speedyrec.data.dataset import TEST_DIRS
    from speedyrec.data.faults import DataError
    from speedyrec.export import export

    with pytest.raises(DataError, match=TEST_DIRS[-1]):
        export(trained, tmp_path / "out", overrides=[f"data.dir={mind_sample}"], split="test")


def test_ranks_by_hand():
    """Three impressions: a plain one; one whose second listed candidate the news file lacks (ranked last, after
    a lower-scored known one); one with a glued token split into two known pieces (ranked by its better piece,
    ties keeping the listed order)."""
    slots = Ragged.from_lengths(np.array([3, 3, 2]), np.array([1, 0, 0, 0, 1, 0, 1, 0], dtype=np.int8))
    # known candidates per impression: 3; 2 (slots 0 and 2); 3 (slot 0 twice, as two pieces, and slot 1)
    cand_offsets = np.array([0, 3, 5, 8])
    cand_slot = np.array([0, 1, 2, 0, 2, 0, 0, 1], dtype=np.int32)
    scores = np.array([0.1, 0.9, 0.5, 0.2, -3.0, 0.1, 0.7, 0.7])
    listing = Listing(np.array(["a", "b", "c"]), np.arange(3), slots, cand_slot)
    ranks, unknown = listed_ranks(listing, cand_offsets, scores)
    assert ranks.tolist() == [3, 1, 2, 1, 3, 2, 1, 2]
    assert unknown == 1
    assert NO_LABEL < 0


def test_a_dev_split_cut_by_time_is_listed_in_the_file_order(mind_sample):
    """One behaviors file, the last 10% by time as dev: the listing keeps each impression's id and place, so dev in
    file order is the file's lines restricted to dev, whose times are not sorted."""
    from speedyrec.config import load_config
    from speedyrec.data.dataset import load_dataset

    cfg = load_config(None, ["data.format=mind", f"data.dir={mind_sample}"])
    dev = load_dataset(cfg.data).dev.in_file_order()
    file_ids = [line.split("\t")[0] for line in _lines(mind_sample / "behaviors.tsv")]
    got = dev.listing.ids.tolist()
    assert len(got) == round(0.1 * len(file_ids))
    where = [file_ids.index(i) for i in got]
    assert where == sorted(where) and len(set(got)) == len(got)
    assert dev.time.tolist() != sorted(dev.time.tolist())
    # each candidate's listed place holds its label, and the listing names every token of the line
    lines = {line.split("\t")[0]: line.split("\t")[4].split() for line in _lines(mind_sample / "behaviors.tsv")}
    for k in range(0, len(dev), 50):
        tokens = lines[got[k]]
        slots = dev.listing.slots.row(k)
        assert slots.tolist() == [int(t[-1]) for t in tokens]
        places = dev.listing.candidate_slot[dev.candidates.offsets[k]:dev.candidates.offsets[k + 1]]
        assert (dev.labels[dev.candidates.offsets[k]:dev.candidates.offsets[k + 1]] == slots[places]).all()


def test_labels_are_optional_only_where_asked(tmp_path):
    """A label-less token is a candidate of a test split (NO_LABEL) but a counted bad token of a training log."""
    from speedyrec.data.behaviors import read_mind_behaviors
    from speedyrec.data.faults import FaultLog
    from speedyrec.data.news import NewsTable

    news = NewsTable()
    for i in ("N1", "N2", "N3"):
        news.add(i, "c", "s", f"title {i}", "", "")
    f = tmp_path / "behaviors.tsv"
    f.write_text("7\tU1\t11/12/2019 2:14:46 PM\tN1\tN2 N3 N9\n3\tU2\t11/11/2019 2:14:46 PM\t\tN3-1 N2\n")
    faults = FaultLog(strict=False)
    test = read_mind_behaviors([f], news, faults, 1 << 20, listing=True, labels_optional=True).in_file_order()
    assert test.listing.ids.tolist() == ["7", "3"] and not test.labelled()
    assert test.listing.slots.row(0).tolist() == [NO_LABEL] * 3 and test.listing.slots.row(1).tolist() == [1, NO_LABEL]
    assert test.candidates.lengths().tolist() == [2, 2] and faults.counts["unknown_news_ids"] == 1
    faults = FaultLog(strict=False)
    train = read_mind_behaviors([f], news, faults, 1 << 20)
    assert train.listing is None and faults.counts["bad_impression_tokens"] == 4
    assert train.candidates.lengths().tolist() == [1, 0]  # time order: the second line first
