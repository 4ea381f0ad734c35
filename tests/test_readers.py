"""Both readers on both real samples, and every kind of bad input on crafted files."""
from pathlib import Path

import pytest

from speedyrec.config import load_config
from speedyrec.data.behaviors import parse_mind_time
from speedyrec.data.dataset import load_dataset
from speedyrec.data.faults import DataError


def _data_cfg(*overrides):
    return load_config(None, list(overrides)).data


def _raw_mind_ids(path: Path):
    """History and candidate ids per impression, straight from the file (a slow, obvious reference)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        _, user, time, hist, imps = line.split("\t")
        rows.append((user, time, hist.split(), [t.rsplit("-", 1) for t in imps.split()]))
    return rows


def test_mind_sample_loads_and_never_aliases_unknown_ids(mind_sample):
    ds = load_dataset(_data_cfg("data.format=mind", f"data.dir={mind_sample}"))
    news_ids = {l.split("\t")[0] for l in (mind_sample / "news.tsv").read_text(encoding="utf-8").splitlines()}
    assert len(ds.news) == len(news_ids) == 2000
    assert len(ds.train) + len(ds.dev) == 5000
    assert len(ds.dev) == 500  # the last 10% by time
    assert ds.train.time.max() <= ds.dev.time.min()

    raw = _raw_mind_ids(mind_sample / "behaviors.tsv")
    unknown = sum(i not in news_ids for _, _, h, c in raw for i in h + [x for x, _ in c])
    assert ds.faults.counts["unknown_news_ids"] == unknown
    assert unknown > 300_000  # ~96% of the ids the slice mentions are not in its news file
    clicks_unknown = sum(l == "1" and i not in news_ids for _, _, _, c in raw for i, l in c)

    # Every kept id is the very id the file named, in order: known ids are kept, unknown ones dropped.
    by_key = {}
    for user, time, hist, cand in raw:
        by_key[(user, parse_mind_time(time))] = ([i for i in hist if i in news_ids],
                                                  [(i, int(l)) for i, l in cand if i in news_ids])
    for part in (ds.train, ds.dev):
        for r in range(len(part)):
            key = (part.users[part.user[r]], int(part.time[r]))
            hist, cand = by_key[key]
            assert [ds.news.ids[i] for i in part.history.row(r)] == hist
            got = list(zip([ds.news.ids[i] for i in part.candidates.row(r)],
                           part.labels[part.candidates.offsets[r]:part.candidates.offsets[r + 1]].tolist()))
            assert got == cand
    assert int(ds.train.unknown_clicks.sum() + ds.dev.unknown_clicks.sum()) == clicks_unknown
    assert ds.faults.counts["clicks_unknown_news"] == int(ds.train.unknown_clicks.sum())


def test_speedyrec_sample_loads_and_splits_glued_ids(speedyrec_sample):
    ds = load_dataset(_data_cfg("data.format=speedyrec", f"data.dir={speedyrec_sample}"))
    assert len(ds.news) == 500
    assert len(ds.train.users) == 2000  # one record per line; ids repeat across shard files
    assert len(ds.dev) == 4000
    glued = ds.faults.counts["glued_ids"]
    assert glued > 5000
    # A glued token like BBUasXoAAu2Zc2 becomes its two real ids, never a third news.
    first = (speedyrec_sample / "traindata" / "ProtoBuf_0.tsv").read_text().splitlines()[0]
    user, imps = first.split("\t")
    pos, neg = imps.split("|")[0].split("&")
    row = 0
    cand = [ds.news.ids[i] for i in ds.train.candidates.row(row)]
    labels = ds.train.labels[ds.train.candidates.offsets[0]:ds.train.candidates.offsets[1]].tolist()
    assert cand == pos.split(";") + [neg[:7], neg[7:]]
    assert labels == [1, 1, 0, 0]
    # histories are the user's earlier clicks within the record
    assert len(ds.train.history.row(0)) == 0
    assert [ds.news.ids[i] for i in ds.train.history.row(1)] == pos.split(";")
    assert ds.train.clicks() > 20000


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


NEWS = (
    "N1\tsports\tnfl\tQuarterback throws four touchdowns\tAn abstract\turl\t[]\t[]\n"
    "N2\tnews\tpolitics\tSenate passes the budget\t\turl\t[]\t[]\n"
    "N3\tfinance\tmarkets\tStocks rally on earnings\tMore text\n"
    "N4\tnews\tpolitics\t\tabstract without a title\turl\t[]\t[]\n"  # empty title
    "N2\tnews\tpolitics\tA different news with the same id\t\turl\t[]\t[]\n"  # duplicate id
    "N5\tonly three columns\n"  # malformed
)


def _bad_mind_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    _write(d / "news.tsv", b"\xef\xbb\xbf" + NEWS.encode())  # with a BOM
    beh = (
        "1\tU1\t11/11/2019 9:05:01 AM\tN1 N2\tN3-1 N2-0 N4-0\r\n"  # CRLF line end
        "2\tU2\t11/11/2019 10:05:01 AM\tN1 N99\tN3-0 N2-1 N98-1\n"  # unknown ids N99 (history) and N98 (a click)
        "3\tU3\t11/11/2019 11:05:01 AM\t\tN3-1 N2-0 N1-x Nbad\n"  # empty history, two bad tokens
        "4\tU4\tnot a time\tN1\tN3-1\n"  # malformed time
        "5\tU5\t11/12/2019 1:00:00 PM\tN1\n"  # wrong column count
        "\n"
        "6\tU6\t11/12/2019 2:00:00 PM\tN1 N3\tN2-1 N4-0\n"
    ).encode() + b"7\tU7\t11/12/2019 3:00:00 PM\tN1\tN2-1 N3-0 \xff\xfe\n"  # invalid UTF-8
    beh += b"8\tU8\t11/12/2019 4:00:00 PM\t" + b"N1 " * 400 + b"\tN2-1 N3-0\n"  # an overlong line
    beh += b"9\tU9\t11/12/2019 5:00:00 PM\tN2\tN1-1 N3-0\n"
    _write(d / "behaviors.tsv", beh)
    _write(d / "bodies.tsv", "N1\tA body about football\nN77\tbody of an unknown news\nbroken row\n")
    return d


def test_bad_rows_are_counted_and_never_crash(tmp_path):
    d = _bad_mind_dir(tmp_path)
    ds = load_dataset(_data_cfg("data.format=mind", f"data.dir={d}", "data.dev_fraction=0", "data.max_line_bytes=1000"))
    c = ds.faults.counts
    assert len(ds.news) == 4  # N1..N4; the duplicate N2 and the 3-column row are not news
    assert c["duplicate_news_ids"] == 1
    assert c["empty_titles"] == 1
    assert c["malformed_rows"] == 1 + 2 + 1  # news row; bad time, 4 columns; bodies row without a tab
    assert c["bad_impression_tokens"] == 2 + 1  # N1-x, Nbad; the replaced invalid bytes of row 7
    assert c["unknown_news_ids"] == 2 + 1  # N99, N98 in behaviors; N77 in bodies
    assert c["clicks_unknown_news"] == 1
    assert c["invalid_utf8_rows"] == 1
    assert c["overlong_rows"] == 1
    assert c["empty_histories"] == 1
    assert len(ds.train) == 6  # impressions 1, 2, 3, 6, 7, 9
    assert ds.news.text["body"][ds.news.index["N1"]] == "A body about football"
    # impression 2: N98 (an unknown click) is gone, not aliased
    r = [i for i in range(len(ds.train)) if ds.train.users[ds.train.user[i]] == "U2"][0]
    assert [ds.news.ids[i] for i in ds.train.candidates.row(r)] == ["N3", "N2"]
    assert [ds.news.ids[i] for i in ds.train.history.row(r)] == ["N1"]
    # the invalid UTF-8 row keeps its good tokens; the bytes became an unparsable token
    r = [i for i in range(len(ds.train)) if ds.train.users[ds.train.user[i]] == "U7"][0]
    assert [ds.news.ids[i] for i in ds.train.candidates.row(r)] == ["N2", "N3"]
    # one warning sums it up
    text = ds.faults.summary()
    assert "unknown_news_ids" in text and "malformed_rows" in text and "bad.tsv" not in text


def test_strict_mode_stops_at_the_first_fault_with_file_and_line(tmp_path):
    d = _bad_mind_dir(tmp_path)
    with pytest.raises(DataError, match=r"news\.tsv:4: news N4 has an empty title"):
        load_dataset(_data_cfg("data.format=mind", f"data.dir={d}", "data.strict=true"))
    _write(d / "news.tsv", NEWS.replace("\t\tabstract without a title", "\tA title\tabstract"))
    with pytest.raises(DataError, match=r"news\.tsv:5: news id N2 defined again"):
        load_dataset(_data_cfg("data.format=mind", f"data.dir={d}", "data.strict=true"))
    _write(d / "news.tsv", "N1\tsports\tnfl\tTitle\tAbstract\n")
    with pytest.raises(DataError, match=r"bodies\.tsv:2: body for unknown news id 'N77'"):
        load_dataset(_data_cfg("data.format=mind", f"data.dir={d}", "data.strict=true"))


def test_layouts_train_dev_and_mind_folder_names(tmp_path):
    for train_name, dev_name in (("train", "dev"), ("MINDsmall_train", "MINDsmall_dev")):
        root = tmp_path / train_name
        _write(root / train_name / "news.tsv", "N1\ta\tb\tTitle one\t\nN2\ta\tb\tTitle two\t\n")
        _write(root / train_name / "behaviors.tsv", "1\tU1\t11/11/2019 9:05:01 AM\tN1\tN2-1 N1-0\n")
        _write(root / dev_name / "news.tsv", "N2\ta\tb\tTitle two\t\nN3\ta\tb\tTitle three\t\n")
        _write(root / dev_name / "behaviors.tsv", "1\tU1\t11/15/2019 9:05:01 AM\tN1 N2\tN3-1 N1-0\n")
        ds = load_dataset(_data_cfg("data.format=mind", f"data.dir={root}"))
        assert len(ds.news) == 3 and len(ds.train) == 1 and len(ds.dev) == 1
        assert sum(ds.faults.counts.values()) == 0


def test_missing_layout_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected news.tsv"):
        load_dataset(_data_cfg("data.format=mind", f"data.dir={tmp_path / 'empty'}"))
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(_data_cfg("data.format=mind", f"data.dir={tmp_path / 'nope'}"))
    with pytest.raises(DataError, match="traindata"):
        load_dataset(_data_cfg("data.format=speedyrec", f"data.dir={tmp_path / 'empty'}"))


def test_speedyrec_malformed_impressions(tmp_path):
    root = tmp_path / "sr"
    _write(root / "traindata" / "DocFeatures.tsv",
           "AAAAAAA\tc\ts\tTitle a\tAbs\tBody\nBBBBBBB\tc\ts\tTitle b\tAbs\tBody\nCCCCCCC\tc\ts\tTitle c\t\t\n"
           "DDDDDDD\tc\ts\tonly five\tcolumns\n")
    _write(root / "traindata" / "ProtoBuf_0.tsv",
           "u1\tAAAAAAA&BBBBBBBCCCCCCC|BBBBBBB;ZZZZZZZ&AAAAAAA|no-ampersand|CCCCCCC&&AAAAAAA\n"
           "u2\textra\tcolumn\n")
    ds = load_dataset(_data_cfg("data.format=speedyrec", f"data.dir={root}", "data.dev_fraction=0"))
    c = ds.faults.counts
    assert c["malformed_rows"] == 2  # the 5-column doc, the 3-column log line
    assert c["glued_ids"] == 1
    assert c["unknown_news_ids"] == 1  # ZZZZZZZ
    assert c["clicks_unknown_news"] == 1
    assert c["bad_impression_tokens"] == 2
    assert len(ds.train) == 2
    assert [ds.news.ids[i] for i in ds.train.candidates.row(0)] == ["AAAAAAA", "BBBBBBB", "CCCCCCC"]
    assert ds.train.labels[:3].tolist() == [1, 0, 0]


def test_mind_time_parser_matches_datetime():
    import datetime

    for text in ("11/12/2019 2:14:46 PM", "1/1/2020 12:00:00 AM", "2/29/2020 12:59:59 PM", "12/31/1999 11:59:59 PM"):
        ref = datetime.datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=datetime.timezone.utc)
        assert parse_mind_time(text) == int(ref.timestamp())
    for bad in ("13/1/2019 1:00:00 PM", "1/1/2019 1:00:00", "yesterday"):
        with pytest.raises(ValueError):
            parse_mind_time(bad)


@pytest.mark.parametrize("fmt", ["mind", "speedyrec"])
def test_sequences_keep_an_impressions_clicks_adjacent(fmt, mind_sample, speedyrec_sample):
    """The engine scores a click from the state before its impression's first click, which assumes the
    clicks of one impression are one run of each user's sequence: check it on both real samples."""
    import numpy as np

    from speedyrec.workflows.speedyfeed import build_sequences

    ds = load_dataset(_data_cfg(f"data.format={fmt}", f"data.dir={mind_sample if fmt == 'mind' else speedyrec_sample}"))
    seqs = build_sequences(ds.train, 10**7)
    seq_of = seqs.clicks.row_ids()
    pools = seqs.click_pool
    real = np.flatnonzero(pools >= 0)
    assert len(real) > 0
    for imp in np.unique(pools[real]):
        at = np.flatnonzero(pools == imp)
        assert (np.diff(at) == 1).all() and len(set(seq_of[at])) == 1, f"impression {imp} is split: {at}"


def _same_behaviors(a, b) -> None:
    import numpy as np

    assert a.users == b.users
    for name in ("user", "time", "labels", "unknown_clicks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("history", "candidates"):
        np.testing.assert_array_equal(getattr(a, name).offsets, getattr(b, name).offsets, err_msg=name)
        np.testing.assert_array_equal(getattr(a, name).values, getattr(b, name).values, err_msg=name)
    assert (a.listing is None) == (b.listing is None)
    if a.listing is not None:
        for name in ("ids", "file_row", "candidate_slot"):
            np.testing.assert_array_equal(getattr(a.listing, name), getattr(b.listing, name), err_msg=name)
        np.testing.assert_array_equal(a.listing.slots.offsets, b.listing.slots.offsets)
        np.testing.assert_array_equal(a.listing.slots.values, b.listing.slots.values)


def _readers_agree(path: Path, news, listing: bool, labels_optional: bool):
    """The line-by-line reader and read_mind_behaviors on one file: the same arrays, counters and examples. Returns
    the line-by-line reader's result and its faults."""
    from speedyrec.data.behaviors import read_mind_behaviors, read_mind_behaviors_by_line
    from speedyrec.data.faults import FaultLog

    got = []
    for read in (read_mind_behaviors_by_line, read_mind_behaviors):
        faults = FaultLog()
        got.append((read([path], news, faults, 1000, listing, labels_optional), faults))
    (a, fa), (b, fb) = got
    _same_behaviors(a, b)
    assert fa.as_dict() == fb.as_dict() and fa.examples == fb.examples, path
    return a, fa


@pytest.mark.parametrize("listing,labels_optional,chunk", [(False, False, 20_000), (True, False, 7), (True, True, 1)])
def test_the_bulk_mind_reader_equals_the_line_by_line_one(tmp_path, mind_sample, synthetic_small, listing,
                                                          labels_optional, chunk, monkeypatch):
    """The bulk reader (split lines, then look every id of a chunk of lines up at once) gives the line-by-line
    reader's arrays and fault counts on the real sample (96% unknown ids), the synthetic data, crafted bad rows and
    glued ids, whatever the chunk size."""
    from speedyrec.data import behaviors

    monkeypatch.setattr(behaviors, "CHUNK_LINES", chunk)
    from speedyrec.data.faults import FaultLog
    from speedyrec.data.news import NewsTable, read_mind_news

    glued = tmp_path / "glued"
    _write(glued / "news.tsv", "".join(f"{i}\tc\ts\ttitle {i}\t\n" for i in ("N1", "N2", "N3", "N45", "N67")))
    _write(glued / "behaviors.tsv",
           "1\tU1\t11/11/2019 9:05:01 AM\tN1N2 N45 N1N9\tN1N3-1 N2-0 N45N67-0 N9N8-1\n"  # glued: known, half, none
           "2\tU2\t11/11/2019 8:05:01 AM\tN2N45N1\tN3 N1-1 N2N3\n"  # three glued; label-less tokens
           "3\tU1\t11/11/2019 8:05:01 AM\t\t\n")  # nothing at all
    cases = [mind_sample, synthetic_small / "train", _bad_mind_dir(tmp_path), glued]
    for d in cases:
        news = NewsTable()
        read_mind_news(d / "news.tsv", news, FaultLog(), 1 << 20)
        a, fa = _readers_agree(d / "behaviors.tsv", news, listing, labels_optional)
        if d == glued:
            assert fa.counts["glued_ids"] >= 5 and len(a) == 3


def test_a_parsed_log_is_kept_and_read_back_with_its_faults(tmp_path, monkeypatch):
    """The second load reads the parsed arrays from the cache (the parser is not called) and reports the same
    fault counters; a changed file is parsed again."""
    import speedyrec.data.dataset as dataset

    d = _bad_mind_dir(tmp_path)
    cfg = _data_cfg("data.format=mind", f"data.dir={d}", "data.dev_fraction=0.3", "data.max_line_bytes=1000",
                    f"data.cache_dir={tmp_path / 'cache'}")
    first = load_dataset(cfg)
    parsed = dataset.read_mind_behaviors
    monkeypatch.setattr(dataset, "read_mind_behaviors", lambda *a, **k: pytest.fail("parsed again"))
    second = load_dataset(cfg)
    _same_behaviors(first.train, second.train)
    _same_behaviors(first.dev, second.dev)
    assert first.faults.as_dict() == second.faults.as_dict() and first.faults.counts["malformed_rows"] == 4
    assert second.faults.examples["unknown_news_ids"] == first.faults.examples["unknown_news_ids"]
    calls = []
    monkeypatch.setattr(dataset, "read_mind_behaviors", lambda *a, **k: calls.append(1) or parsed(*a, **k))
    with open(d / "behaviors.tsv", "ab") as f:
        f.write(b"10\tU10\t11/12/2019 6:00:00 PM\tN2\tN1-1 N3-0\n")
    third = load_dataset(cfg)
    assert calls and len(third.train) + len(third.dev) == len(first.train) + len(first.dev) + 1


@pytest.mark.parametrize("block", [1, 7, 64, 8 << 20])
def test_rows_read_in_blocks_are_the_rows_read_line_by_line(tmp_path, block):
    """Every quirk read_rows handles (BOM, CRLF, blank and whitespace-only lines, invalid UTF-8, overlong lines, a
    last line without its newline), also across block boundaries, gives the same rows and counts in blocks of bytes
    (read_line_bytes) decoded by block_rows."""
    from speedyrec.data.faults import FaultLog, block_rows, read_line_bytes, read_rows

    def read_row_blocks(path, faults, max_line_bytes, block_bytes):  # the byte blocks decoded as the readers do
        for first, data in read_line_bytes(path, max_line_bytes, block_bytes):
            raws = data.split(b"\n")
            yield block_rows(path, faults, max_line_bytes, range(first, first + len(raws)), raws)

    files = {
        "quirks": b"\xef\xbb\xbfa\tb\r\n\n   \n\t\x0b\nc d\nbad \xff\xfe bytes\n" + b"x" * 40 + b"\nlong\xff" * 3
                  + b"\n" + b"y" * 30 + b"\n\xc3\xa9t\xc3\xa9\nlast",
        "empty": b"",
        "newlines": b"\n\n\r\n",
        "overlong_last": b"ok\n" + b"z" * 31,
        "exact": b"q" * 30 + b"\n" + b"r" * 30,
    }
    for name, data in files.items():
        path = tmp_path / f"{name}.tsv"
        path.write_bytes(data)
        fa, fb = FaultLog(), FaultLog()
        rows = list(read_rows(path, fa, 30))
        blocks = [(n, t) for numbers, texts in read_row_blocks(path, fb, 30, block) for n, t in zip(numbers, texts)]
        assert blocks == rows, name
        assert fa.as_dict() == fb.as_dict() and fa.examples == fb.examples, name


@pytest.mark.parametrize("block", [16, 97, 8 << 20])
@pytest.mark.parametrize("listing,labels_optional", [(False, False), (True, False), (True, True)])
def test_plain_lines_cut_with_numpy_and_faulty_ones_between_them_read_as_line_by_line(tmp_path, monkeypatch, block,
                                                                                      listing, labels_optional):
    """The bulk reader cuts plain lines with numpy over the block's bytes and sends every other line through the
    text rules, in file order: plain and faulty lines interleaved, users first seen on either kind, blocks that cut
    lines anywhere, ids too long or not ASCII for the byte keys: the line-by-line reader's arrays, counters and
    examples, and both paths were taken."""
    from speedyrec.data import behaviors
    from speedyrec.data.faults import FaultLog
    from speedyrec.data.news import NewsTable, read_mind_news

    monkeypatch.setattr(behaviors, "BLOCK_BYTES", block)
    ids = [f"N{i}" for i in range(1, 10)] + ["N123456789", "Né1", "N12345678"]
    _write(tmp_path / "news.tsv", "".join(f"{i}\tc\ts\ttitle {i}\t\n" for i in ids))
    t = "11/11/2019 9:0{}:01 AM"
    lines = [
        f"1\tU1\t{t.format(5)}\tN1 N2\tN3-1 N4-0",  # plain
        f"2\tU2\t{t.format(4)}\tN1 N77\tN3-0",  # unknown id: text
        f"3\tU2\t{t.format(4)}\tN2\tN3-1 N5-0",  # plain; U2 first seen on a text line
        "4\tU3\tnot a time\tN1\tN2-1",  # bad time: text, skipped
        f"5\tU3\t{t.format(3)}\tN5\tN6-1",  # plain; U3's first kept line
        f"6\t  \t{t.format(3)}\tN1\tN2-1",  # a blank user: text, skipped
        f"7\tU4\t{t.format(2)}\tN123456789 N12345678\tN2-1 N123456789-0",  # ids of 10 and 9 bytes: text
        f"8\tU5\t{t.format(2)}\tNé1\tN2-0",  # a non-ASCII id: text
        f"9\tU6\t{t.format(1)}\t\tN2-1",  # empty history: text
        f" 10 \t U7 \t {t.format(1)} \t N1  N2 \tN3-1  N4-0 ",  # blanks around fields and tokens: plain
        f"11\tU8\t{t.format(6)}\tN1\tN2-1\r",  # CR: text
        f"12\tU9\t{t.format(6)}\tN1\tN2 N3-1",  # a token without its label: text
        f"13\tU1\t{t.format(7)}\tN1N2\tN3-1",  # glued ids: text
        f"14\tU10\t{t.format(7)}\tN9\tN8-0 N7-1 N1-0",  # plain
        f"15\tU11\t{t.format(7)}\tN1\tN2-1\textra",  # six columns: text
        f"\tU12\t{t.format(8)}\tN1\tN2-x",  # no impression id, a bad label: text
        f"\tU12\t{t.format(8)}\tN1\tN2-1",  # no impression id: plain
        "",
        f"18\tU13\t{t.format(9)}\tN4\t",  # no candidates: plain
    ]
    _write(tmp_path / "behaviors.tsv", "\n".join(lines) + "\n")
    news = NewsTable()
    read_mind_news(tmp_path / "news.tsv", news, FaultLog(), 1 << 20)
    seen = []
    real = behaviors._plain_lines
    monkeypatch.setattr(behaviors, "_plain_lines", lambda *a: seen.append(real(*a)) or seen[-1])
    _readers_agree(tmp_path / "behaviors.tsv", news, listing, labels_optional)
    plain = sum(int(p.plain.sum()) for p in seen)
    assert plain == 7 and sum(len(p.plain) for p in seen) == len(lines)


@pytest.mark.parametrize("piece", [7, 1 << 16])
def test_a_training_log_spooled_into_the_cache_equals_its_parse_in_memory(tmp_path, monkeypatch, synthetic_small,
                                                                           mind_sample, piece):
    """The rank that parses a training log writes it part by part into the cache's folder and sorts it there in
    pieces (its memory holds a block, not the log): the arrays, counts and examples of the parse in memory, and of
    the line-by-line reader; the second load reads them back."""
    import numpy as np

    from speedyrec.data import behaviors
    from speedyrec.data.behaviors import read_mind_behaviors, read_mind_behaviors_by_line
    from speedyrec.data.faults import FaultLog
    from speedyrec.data.news import NewsTable, read_mind_news
    from speedyrec.data.parse_cache import cached_read

    monkeypatch.setattr(behaviors._Spool, "PIECE", piece)
    monkeypatch.setattr(behaviors, "BLOCK_BYTES", 4096)
    for k, d in enumerate([synthetic_small / "train", mind_sample, _bad_mind_dir(tmp_path)]):
        news = NewsTable()
        read_mind_news(d / "news.tsv", news, FaultLog(), 1 << 20)
        path = [d / "behaviors.tsv"]
        for listing in (False, True):  # a training log, and a dev log with its listing
            fa, fb, fc = FaultLog(), FaultLog(), FaultLog()
            plain = read_mind_behaviors_by_line(path, news, fa, 1000, listing)
            read = lambda p, n, f, spool: read_mind_behaviors(p, n, f, 1000, listing, spool=spool)  # noqa: E731
            cache = tmp_path / f"cache{k}"
            spooled = cached_read(read, path, news, fb, cache, {"case": k, "listing": listing})
            assert isinstance(spooled.candidates.values, np.memmap) and not list(cache.rglob("*.raw"))
            assert listing == isinstance(getattr(spooled.listing, "candidate_slot", None), np.memmap)
            _same_behaviors(plain, spooled)
            assert fa.as_dict() == fb.as_dict() and fa.examples == fb.examples
            again = cached_read(lambda *a: pytest.fail("parsed again"), path, news, fc, cache,
                                {"case": k, "listing": listing})
            _same_behaviors(plain, again)
            assert fc.as_dict() == fa.as_dict()
            np.testing.assert_array_equal(plain.in_file_order().user, again.in_file_order().user)


def test_stamps_read_in_place_equal_the_text_parser():
    """Stamps read from the bytes in place (the plain-line path) give parse_mind_time's seconds, and are refused
    exactly where it raises for the canonical form; any other form is left to the text path (never misread)."""
    import numpy as np

    from speedyrec.data.behaviors import _stamps_in_bytes, parse_mind_time

    rng = np.random.default_rng(0)
    canonical = [f"{m}/{d}/{y} {h}:{mi:02d}:{s:02d} {half}"
                 for m, d, y, h, mi, s, half in zip(rng.integers(0, 15, 3000), rng.integers(0, 34, 3000),
                                                    rng.choice([1999, 2000, 2019, 2020, 2100], 3000),
                                                    rng.integers(0, 14, 3000), rng.integers(0, 62, 3000),
                                                    rng.integers(0, 63, 3000), rng.choice(["AM", "PM"], 3000))]
    canonical += ["12/31/2019 12:59:59 PM", "1/1/1970 12:00:00 AM", "2/29/2020 1:02:03 AM", "2/29/2019 1:02:03 AM"]
    other = [" 11/11/2019 9:05:01 AM", "11/11/2019 9:05:01 AM ", "11-11-2019 9:05:01 AM", "11/11/19 9:05:01 AM",
             "11/11/2019 9:5:01 AM", "11/11/2019 09:05:01 am", "11/11/2019  9:05:01 AM", "111/1/2019 9:05:01 AM",
             "11/11/2019 9:05:01 XM", "", "x" * 22, "11/11/2019 123:05:01 AM", "a1/11/2019 9:05:01 AM"]
    stamps = canonical + other
    data = "\t".join(stamps).encode()
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum([len(s) + 1 for s in stamps])[:-1]])
    seconds, ok = _stamps_in_bytes(buf, starts, starts + np.array([len(s) for s in stamps]))
    for s, sec, good in zip(stamps, seconds.tolist(), ok.tolist()):
        try:
            want = parse_mind_time(s)
        except ValueError:
            want = None
        if s in canonical:
            assert good == (want is not None), s
        if good:
            assert sec == want, s
    assert not ok[len(canonical):].any()
    assert ok[:len(canonical)].sum() > 1000  # most canonical stamps are in range


def test_the_key_table_finds_what_it_holds_as_it_grows():
    """The numpy hash table of ids and users: every key inserted (in batches, the table doubling on the way) is
    found with its value, and keys never inserted are not (-1), colliding slots included."""
    import numpy as np

    from speedyrec.data.behaviors import _KeyTable

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(1, 1 << 40, 6000).astype(np.uint64))
    rng.shuffle(keys)
    held, others = keys[:5000], keys[5000:]
    table = _KeyTable()
    for part in np.array_split(np.arange(len(held)), 7):
        table.insert(held[part], part.astype(np.int64) * 3)
    assert len(table.keys) >= 2 * len(held) and table.count == len(held)
    np.testing.assert_array_equal(table.find(held), np.arange(len(held)) * 3)
    assert (table.find(others) == -1).all()
