"""Impression logs: one row per impression, histories and candidates as news indices (CSR)."""
from __future__ import annotations

import itertools
import operator
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speedyrec.data.faults import FaultLog, block_rows, read_line_bytes, read_rows
from speedyrec.data.news import NewsTable
from speedyrec.data.ragged import Ragged, ragged_positions

_IMPRESSION_TOKEN = re.compile(r"^(\S+)-([01])$")
NO_LABEL = -1  # a candidate of a label-less impression (MIND's test split lists ``N123``, not ``N123-0``)


@dataclass
class Behaviors:
    """Impressions in time order per user.

    ``history`` is what the log says the user clicked before the impression, oldest first;
    ``candidates``/``labels`` are the impressed news and whether each was clicked. Unknown news ids
    are removed (and counted) before they reach these arrays; ``unknown_clicks`` keeps, per
    impression, how many clicks were lost that way.
    """

    users: list[str]
    user: np.ndarray  # int64 [I]
    time: np.ndarray  # int64 [I], seconds (or the position in the file for formats without time)
    history: Ragged  # int32 news indices
    candidates: Ragged  # int32 news indices
    labels: np.ndarray  # int8, aligned with candidates.values
    unknown_clicks: np.ndarray  # int64 [I]
    history_is_prefix: bool = False  # histories are the user's earlier clicks in this log (no separate history)
    # what a prediction file needs, kept where the reader was asked to (dev and test logs):
    listing: "Listing | None" = None

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> "Behaviors":
        rows = np.asarray(rows, dtype=np.int64)
        cand = self.candidates.take(rows)
        label_rows = Ragged(self.candidates.offsets, self.labels).take(rows)
        listing = None
        if self.listing is not None:
            listing = self.listing.take(rows, self.candidates.offsets)
        return Behaviors(self.users, self.user[rows], self.time[rows], self.history.take(rows), cand,
                         label_rows.values, self.unknown_clicks[rows], self.history_is_prefix, listing)

    def in_file_order(self) -> "Behaviors":
        """The same impressions in the order the file lists them (readers sort MIND's by time)."""
        if self.listing is None:
            return self
        return self.take(np.argsort(self.listing.file_row, kind="stable"))

    def labelled(self) -> bool:
        return bool((self.labels != NO_LABEL).all()) and (self.listing is None or
                                                         bool((self.listing.slots.values != NO_LABEL).all()))

    def clicks(self) -> int:
        return int(self.labels.sum())

    def non_clicked(self) -> Ragged:
        """Per impression, its non-clicked candidates (the pool negatives are drawn from first)."""
        neg = self.labels == 0
        return Ragged.from_lengths(np.bincount(self.candidates.row_ids()[neg], minlength=len(self)),
                                   self.candidates.values[neg])


def user_owners(beh: Behaviors, world: int) -> np.ndarray:
    """The rank that trains each user [len(beh.users)], users balanced by their clicks: the history a user starts
    with plus their impressions' clicks, heaviest first, dealt to ranks 0..W-1, W-1..0, 0..W-1, ... (ties by user
    index: every rank computes the same owners from the same log)."""
    n_users = len(beh.users)
    weight = np.zeros(n_users, dtype=np.int64)
    offsets, user = np.asarray(beh.candidates.offsets), np.asarray(beh.user)
    piece = 1 << 24
    for a in range(0, len(beh.labels), piece):  # in pieces: a click mask of the whole log would be its size again
        clicks = a + np.flatnonzero(np.asarray(beh.labels[a:a + piece]) == 1)
        weight += np.bincount(user[np.searchsorted(offsets, clicks, side="right") - 1], minlength=n_users)
    if not beh.history_is_prefix and len(beh):
        users, first = np.unique(np.asarray(beh.user), return_index=True)
        weight[users] += np.diff(np.asarray(beh.history.offsets))[first]
    order = np.lexsort((np.arange(n_users), -weight))
    k = np.arange(n_users)
    dealt = np.where((k // world) % 2 == 0, k % world, world - 1 - k % world)
    owner = np.empty(n_users, dtype=np.int32)
    owner[order] = dealt
    return owner


def user_share(beh: Behaviors, rank: int, world: int, chunk_rows: int = 1 << 16) -> Behaviors:
    """The impressions of the users ``rank`` trains (:func:`user_owners`), in their order. Read in chunks of rows:
    where ``beh`` is mapped from the parse cache, the pages a chunk read are handed back before the next one
    (speedyrec.data.parse_cache.release), so a rank's resident memory holds its share, not the whole log."""
    from speedyrec.data.parse_cache import release

    mine = user_owners(beh, world)[np.asarray(beh.user)] == rank
    release(beh)
    parts = []
    for a in range(0, len(beh), chunk_rows):
        rows = a + np.flatnonzero(mine[a:a + chunk_rows])
        if len(rows):
            parts.append(beh.take(rows))
        release(beh)
    if not parts:
        return beh.take(np.zeros(0, dtype=np.int64))
    return _concat_behaviors(parts) if len(parts) > 1 else parts[0]


@dataclass
class Listing:
    """An impression log as its file lists it, for files that must answer it line by line (MIND's prediction
    file): every impression's id and place in the file, and every candidate the line lists, in its order,
    including the ones the news file lacks (which ``Behaviors.candidates`` leaves out).

    ``slots`` holds, per impression, the label of each listed candidate (NO_LABEL when the file gives none);
    ``candidate_slot`` [len(candidates.values)] the listed place of each kept candidate (the pieces of a glued
    token share its place)."""

    ids: np.ndarray  # str [I]: the file's impression id (MIND's first column; ``<file>:<line>`` for logs without)
    file_row: np.ndarray  # int64 [I]: the impression's place among the rows read, in file order
    slots: Ragged  # int8 labels
    candidate_slot: np.ndarray  # int32, aligned with Behaviors.candidates.values

    def take(self, rows: np.ndarray, candidate_offsets: np.ndarray) -> "Listing":
        slot = Ragged(candidate_offsets, self.candidate_slot).take(rows).values
        return Listing(self.ids[rows], self.file_row[rows], self.slots.take(rows), slot)


@dataclass
class _Builder:
    news: NewsTable
    faults: FaultLog
    users: list[str] = field(default_factory=list)
    user_index: dict[str, int] = field(default_factory=dict)
    user: list[int] = field(default_factory=list)
    time: list[int] = field(default_factory=list)
    history: list[np.ndarray] = field(default_factory=list)
    candidates: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    unknown_clicks: list[int] = field(default_factory=list)
    listing: bool = False  # keep a Listing (see add())
    ids: list[str] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    candidate_slot: list[np.ndarray] = field(default_factory=list)
    _width_cache: tuple | None = None
    user_keys: "_KeyTable | None" = None  # plain lines' user ids (of 1 to 8 bytes) -> their index (see _PlainLines)

    @property
    def _widths(self) -> tuple:
        """The id lengths of the news table, shortest first (computed once, when a token may be glued ids)."""
        if self._width_cache is None:
            self._width_cache = tuple(sorted({len(i) for i in self.news.ids}))
        return self._width_cache

    def user_id(self, key: str) -> int:
        u = self.user_index.get(key)
        if u is None:
            u = self.user_index[key] = len(self.users)
            self.users.append(key)
        return u

    def split_glued(self, token: str, where: str) -> list[str]:
        """A token that is no known id, but the concatenation of ids whose separator went missing.

        Only tokens whose length is no id length of this corpus are split, into pieces of id
        lengths, choosing the split with the most known pieces; a token with no known piece in any
        split stays one (unknown) id. Known pieces are real ids of the token, never aliases.
        """
        n = len(token)
        if token in self.news.index or not self._widths or n in self._widths or n < 2 * self._widths[0]:
            return [token]
        best: list[str] = []
        best_known = 0

        def search(pos: int, pieces: list[str], known: int) -> None:
            nonlocal best, best_known
            if pos == n:
                if known > best_known:
                    best, best_known = list(pieces), known
                return
            for w in self._widths:
                if pos + w <= n:
                    piece = token[pos : pos + w]
                    pieces.append(piece)
                    search(pos + w, pieces, known + (piece in self.news.index))
                    pieces.pop()

        if n <= 6 * self._widths[-1]:
            search(0, [], 0)
        if best_known == 0:
            return [token]
        self.faults.fault("glued_ids", where, f"token {token!r} split into {' '.join(best)}")
        return best

    def lookup(self, tokens: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
        """Indices of ids (glued ids split); returns (indices, known mask)."""
        idx, known, _ = self.lookup_listed(tokens, [0] * len(tokens), where)
        return idx, known

    def lookup_listed(self, tokens: list[str], labels: list[int], where: str) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Candidates as listed (one label each): (indices, known mask, (labels, listed place of each index))
        with glued ids split into pieces that share their token's place."""
        ids, piece_labels, places = [], [], []
        for k, (tok, label) in enumerate(zip(tokens, labels)):
            pieces = self.split_glued(tok, where)
            ids.extend(pieces)
            piece_labels.extend([label] * len(pieces))
            places.extend([k] * len(pieces))
        idx = self.news.lookup(ids)
        known = idx >= 0
        if n_unknown := int((~known).sum()):
            first = ids[int(np.argmin(known))]
            self.faults.fault("unknown_news_ids", where, f"news id {first!r} is not in the news table", n_unknown)
        return idx, known, (np.asarray(piece_labels, dtype=np.int8), np.asarray(places, dtype=np.int64))

    def add(self, user: int, time: int, history: np.ndarray, cand: np.ndarray, labels: np.ndarray,
            unknown_clicks: int, where: str, listed: tuple | None = None) -> None:
        """``listed`` = (impression id, labels of every listed candidate, listed place of each of ``cand``), kept
        when the builder keeps a listing."""
        if len(history) == 0:
            self.faults.fault("empty_histories", where, "the user history is empty")
        if self.listing:
            imp_id, slot_labels, cand_slot = listed
            self.ids.append(imp_id)
            self.slots.append(np.asarray(slot_labels, dtype=np.int8))
            self.candidate_slot.append(np.asarray(cand_slot, dtype=np.int32))
        self.user.append(user)
        self.time.append(time)
        self.history.append(history.astype(np.int32))
        self.candidates.append(cand.astype(np.int32))
        self.labels.append(labels.astype(np.int8))
        self.unknown_clicks.append(unknown_clicks)

    def build(self) -> Behaviors:
        return Behaviors(
            users=self.users,
            user=np.asarray(self.user, dtype=np.int64),
            time=np.asarray(self.time, dtype=np.int64),
            history=Ragged.from_lengths(np.array([len(h) for h in self.history], dtype=np.int64),
                                        _concat(self.history)),
            candidates=Ragged.from_lengths(np.array([len(c) for c in self.candidates], dtype=np.int64),
                                           _concat(self.candidates)),
            labels=_concat(self.labels, np.int8),
            unknown_clicks=np.asarray(self.unknown_clicks, dtype=np.int64),
            listing=Listing(np.asarray(self.ids, dtype=str), np.arange(len(self.user), dtype=np.int64),
                            Ragged.from_lengths(np.array([len(x) for x in self.slots], dtype=np.int64),
                                                _concat(self.slots, np.int8)),
                            _concat(self.candidate_slot)) if self.listing else None,
        )


def _concat(parts: list[np.ndarray], dtype=np.int32) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


_DAYS_BEFORE_MONTH = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])


def parse_mind_time(text: str) -> int:
    """Seconds since 1970 of MIND's ``M/D/YYYY h:mm:ss AM`` (UTC assumed); ValueError when malformed."""
    date, clock, half = text.split(" ")
    month, day, year = (int(x) for x in date.split("/"))
    hour, minute, second = (int(x) for x in clock.split(":"))
    if not (1 <= month <= 12 and 1 <= day <= 31 and 1 <= hour <= 12 and 0 <= minute < 60 and 0 <= second < 61):
        raise ValueError(text)
    if half not in ("AM", "PM"):
        raise ValueError(text)
    hour = hour % 12 + (12 if half == "PM" else 0)
    y = year - 1
    days = y * 365 + y // 4 - y // 100 + y // 400 - 719162  # days from 0001-01-01 to 1970-01-01
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days += int(_DAYS_BEFORE_MONTH[month - 1]) + (1 if leap and month > 2 else 0) + day - 1
    return ((days * 24 + hour) * 60 + minute) * 60 + second


def parse_mind_times(stamps: list[str]) -> dict[str, int | None]:
    """:func:`parse_mind_time` of many stamps with numpy (None where it raises): the fields of all stamps are cut
    out in a few string calls and checked and converted as arrays; a stamp that is not plainly
    ``M/D/YYYY h:mm:ss AM`` is parsed on its own."""
    out: dict[str, int | None] = {}
    if not stamps:
        return out
    parts = " ".join(stamps).split(" ")
    fields = None
    if len(parts) == 3 * len(stamps):
        date, clock, half = parts[0::3], parts[1::3], parts[2::3]
        d, c = "/".join(date).split("/"), ":".join(clock).split(":")
        digits = "".join(d) + "".join(c)
        if len(d) == len(c) == 3 * len(stamps) and "" not in d and "" not in c and digits.isascii() \
                and digits.isdigit():
            fields = np.asarray(d, dtype=np.int64).reshape(-1, 3), np.asarray(c, dtype=np.int64).reshape(-1, 3), half
    if fields is None:
        for s in stamps:
            try:
                out[s] = parse_mind_time(s)
            except ValueError:
                out[s] = None
        return out
    (month, day, year), (hour, minute, second) = fields[0].T, fields[1].T
    half = np.asarray(fields[2])
    seconds, ok = _stamp_seconds(month, day, year, hour, minute, second, half == "PM")
    ok &= (half == "AM") | (half == "PM")
    for s, good, t in zip(stamps, ok.tolist(), seconds.tolist()):
        out[s] = t if good else None
    return out


def _stamp_seconds(month, day, year, hour, minute, second, pm) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since 1970, whether the fields are in range) of MIND stamps given as arrays of their fields, as
    :func:`parse_mind_time` computes them."""
    ok = ((1 <= month) & (month <= 12) & (1 <= day) & (day <= 31) & (1 <= hour) & (hour <= 12) & (minute < 60)
          & (second < 61))
    hour = hour % 12 + np.where(pm, 12, 0)
    y = year - 1
    days = y * 365 + y // 4 - y // 100 + y // 400 - 719162
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    days = days + _DAYS_BEFORE_MONTH[np.clip(month - 1, 0, 11)] + ((month > 2) & leap) + day - 1
    return ((days * 24 + hour) * 60 + minute) * 60 + second, ok


def _stamps_in_bytes(buf: np.ndarray, a: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MIND stamps read in place: the fields buf[a:e] of the form ``M/D/YYYY h:mm:ss AM`` exactly (no blanks around,
    one- or two-digit month, day and hour) -> (seconds, ok). ok is False for any other field (the caller reads those
    as text), and for one out of range (as parse_mind_time would refuse it)."""
    n = len(a)
    d = lambda at: buf[np.clip(at, 0, len(buf) - 1)].astype(np.int64) - 48  # noqa: E731
    digit = lambda v: (v >= 0) & (v <= 9)  # noqa: E731
    size = e - a
    ok = (size >= 19) & (size <= 22)
    pm = d(e - 2) == ord("P") - 48
    ok &= ((d(e - 2) == ord("A") - 48) | pm) & (d(e - 1) == ord("M") - 48) & (d(e - 3) == -16)
    sec1, sec0, min1, min0 = d(e - 5), d(e - 4), d(e - 8), d(e - 7)
    ok &= digit(sec1) & digit(sec0) & digit(min1) & digit(min0) & (d(e - 6) == 10) & (d(e - 9) == 10)
    h0, h1 = d(e - 10), d(e - 11)
    two_h = digit(h1)
    ok &= digit(h0) & (two_h | (h1 == -16))
    ye = e - 12 - two_h  # the year's last digit, after which comes the blank before the hour
    ok &= ~two_h | (d(e - 12) == -16)
    y3, y2, y1, y0 = d(ye - 3), d(ye - 2), d(ye - 1), d(ye)
    ok &= digit(y3) & digit(y2) & digit(y1) & digit(y0) & (d(ye - 4) == -1)  # '/' before the year
    d0, d1 = d(ye - 5), d(ye - 6)
    two_d = digit(d1)
    slash = ye - 6 - two_d  # the '/' after the month
    ok &= digit(d0) & (two_d | (d1 == -1)) & (d(slash) == -1)
    m_size = slash - a
    m1, m0 = d(a), d(a + 1)
    ok &= ((m_size == 1) & digit(m1)) | ((m_size == 2) & digit(m1) & digit(m0))
    month = np.where(m_size == 2, m1 * 10 + m0, m1)
    day = np.where(two_d, d1 * 10 + d0, d0)
    hour = np.where(two_h, h1 * 10 + h0, h0)
    seconds, valid = _stamp_seconds(month, day, y3 * 1000 + y2 * 100 + y1 * 10 + y0, hour, min1 * 10 + min0,
                                    sec1 * 10 + sec0, pm)
    return (seconds if n else np.zeros(0, dtype=np.int64)), ok & valid


def read_mind_behaviors(paths: list[Path], news: NewsTable, faults: FaultLog, max_line_bytes: int,
                        listing: bool = False, labels_optional: bool = False, spool: Path | None = None) -> Behaviors:
    """MIND ``behaviors.tsv``: impression_id, user_id, time, history (ids), impressions (id-label).

    Rows are sorted by time (stable) after reading; ``listing`` keeps each impression's id, place in the file and
    listed candidates (:class:`Listing`). ``labels_optional``: a candidate may come without its label (MIND's
    test split), stored as NO_LABEL; otherwise such a token is a bad token, counted and left out.

    Lines are split in one pass and every id is looked up in bulk afterwards (:func:`_read_mind_bulk`); under
    ``data.strict`` the line-by-line reader runs instead, so that the first fault in file order stops it. Both
    give the same arrays and counts (tests/test_readers.py).

    ``spool``: a folder for the parse cache's files. The log is then parsed into files there as it is read, sorted
    from them, and comes back mapped from them: the parse holds one block of the log in memory (and a listing's
    impression ids), not the log (:class:`_Spool`).
    """
    if faults.strict:
        return read_mind_behaviors_by_line(paths, news, faults, max_line_bytes, listing, labels_optional)
    return _read_mind_bulk(paths, news, faults, max_line_bytes, listing, labels_optional, spool)


def read_mind_behaviors_by_line(paths: list[Path], news: NewsTable, faults: FaultLog, max_line_bytes: int,
                                listing: bool = False, labels_optional: bool = False) -> Behaviors:
    """:func:`read_mind_behaviors` one line at a time (each id looked up, and checked for glued ids, as read)."""
    b = _Builder(news, faults, listing=listing)
    for path in paths:
        for lineno, line in read_rows(path, faults, max_line_bytes):
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            if len(cols) != 5:
                faults.fault("malformed_rows", where, f"expected 5 tab-separated columns, found {len(cols)}")
                continue
            imp_id, user_id, time_text, history_text, imp_text = cols
            user_id = user_id.strip()
            if not user_id:
                faults.fault("malformed_rows", where, "empty user id")
                continue
            try:
                t = parse_mind_time(time_text.strip())
            except ValueError:
                faults.fault("malformed_rows", where, f"unparsable time {time_text!r}")
                continue
            hist, known = b.lookup(history_text.split(), where)
            hist = hist[known]
            cand_ids, slot_labels = [], []
            for tok in imp_text.split():
                m = _IMPRESSION_TOKEN.match(tok)
                if m is not None:
                    cand_ids.append(m.group(1))
                    slot_labels.append(int(m.group(2)))
                elif labels_optional:
                    cand_ids.append(tok)
                    slot_labels.append(NO_LABEL)
                else:
                    faults.fault("bad_impression_tokens", where, f"impression token {tok!r} is not <news_id>-<0|1>")
            cand, known, (labels, places) = b.lookup_listed(cand_ids, slot_labels, where)
            b.add(b.user_id(user_id), t, hist, cand[known], labels[known], int((labels[~known] == 1).sum()), where,
                  (imp_id.strip() or f"{path.name}:{lineno}", slot_labels, places[known]))
    beh = b.build()
    order = np.argsort(beh.time, kind="stable")
    return beh.take(order) if len(order) else beh


CHUNK_LINES = 20_000  # lines split before their ids are looked up: bounds the token strings held at once


BLOCK_BYTES = 1 << 20  # bytes of whole lines read and cut at once (arrays the allocator reuses, not maps anew)


def _read_mind_bulk(paths: list[Path], news: NewsTable, faults: FaultLog, max_line_bytes: int, listing: bool,
                    labels_optional: bool, spool: Path | None = None) -> Behaviors:
    """:func:`read_mind_behaviors` in blocks of bytes. A block's plain lines (ASCII, five columns, every news id known
    and at most 8 bytes, every candidate ``<id>-<0|1>``, a history, a user and a valid time: nearly every line of a
    clean log) are cut and looked up with numpy over the block's bytes (:func:`_plain_lines`). The other lines go,
    in file order between the plain ones, through the text path: decoded and checked as read_rows does, columns
    and tokens split per chunk of lines, ids looked up in one pass, glued ids split, faults counted by the
    line-by-line rules (:func:`_split_lines`). Same arrays, counters and first examples as the line-by-line reader:
    a plain line has no fault to count, and every other line is read by the rules that count them."""
    b = _Builder(news, faults, listing=listing)
    table = _IdTable.of(news)
    times: dict[str, int] = {}
    sink = _Spool(spool, listing) if spool is not None else None
    parts: list[Behaviors] = []
    rows = 0
    for path in paths:
        for first, data in read_line_bytes(path, max_line_bytes, BLOCK_BYTES):
            if len(times) > 1 << 16:  # the stamps seen lately are the likely ones: the memo stays small
                times.clear()
            plain = _plain_lines(data, table, max_line_bytes, times)
            for plain_run, i, j in _runs(plain.plain):
                if plain_run:
                    part = plain.build(data, i, j, path, first, b, listing, rows)
                    sink.add(part) if sink else parts.append(part)
                    rows += len(part)
                    continue
                raws = [data[a:e] for a, e in zip(plain.start[i:j].tolist(), plain.end[i:j].tolist())]
                numbers, lines = block_rows(path, faults, max_line_bytes, range(first + i, first + j), raws)
                for s0 in range(0, len(lines), CHUNK_LINES):
                    chunk = _split_lines(path, numbers[s0:s0 + CHUNK_LINES], lines[s0:s0 + CHUNK_LINES], b, faults,
                                         times, labels_optional, listing)
                    if chunk.user:
                        part = chunk.build(b, faults, listing, rows)
                        sink.add(part) if sink else parts.append(part)
                        rows += len(chunk.user)
    if sink:
        return sink.sorted(b.users)
    if not parts:
        parts.append(_Chunk(wheres=_Where(Path(), [])).build(b, faults, listing, 0))
    beh = _concat_behaviors(parts) if len(parts) > 1 else parts[0]
    order = np.argsort(beh.time, kind="stable")
    return beh.take(order) if len(order) else beh


class _Spool:
    """A log's arrays written part by part to files in ``directory`` as they are parsed, then sorted by time into the
    parse cache's ``.npy`` files there, in pieces: what the parse holds at once is a block and a piece, not the log
    (and, for a log with a listing, its impression ids)."""

    # field -> (dtype, how a part gives it)
    FIELDS = {"user": (np.int64, lambda p: p.user), "time": (np.int64, lambda p: p.time),
              "unknown_clicks": (np.int64, lambda p: p.unknown_clicks),
              "history.lengths": (np.int64, lambda p: p.history.lengths()),
              "history.values": (np.int32, lambda p: p.history.values),
              "candidates.lengths": (np.int64, lambda p: p.candidates.lengths()),
              "candidates.values": (np.int32, lambda p: p.candidates.values), "labels": (np.int8, lambda p: p.labels)}
    LISTING = {"listing.file_row": (np.int64, lambda p: p.listing.file_row),
               "listing.slots.lengths": (np.int64, lambda p: p.listing.slots.lengths()),
               "listing.slots.values": (np.int8, lambda p: p.listing.slots.values),
               "listing.candidate_slot": (np.int32, lambda p: p.listing.candidate_slot)}
    PIECE = 1 << 14  # rows gathered at once while sorting (their positions take 24 bytes a value)

    def __init__(self, directory: Path, listing: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fields = {**self.FIELDS, **(self.LISTING if listing else {})}
        self.listing = listing
        self.ids: list[np.ndarray] = []
        self.files = {k: open(self.directory / f"{k}.raw", "wb") for k in self.fields}

    def add(self, part: Behaviors) -> None:
        for k, (dtype, get) in self.fields.items():
            np.ascontiguousarray(get(part), dtype=dtype).tofile(self.files[k])
        if self.listing:
            self.ids.append(part.listing.ids)

    def _raw(self, k: str) -> np.ndarray:
        path = self.directory / f"{k}.raw"
        dtype = self.fields[k][0]
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def sorted(self, users: list[str]) -> Behaviors:
        """The log in time order (stable), written as ``<field>.npy`` and returned mapped from those files."""
        from speedyrec.data.parse_cache import drop_pages, mapped

        for f in self.files.values():
            f.close()
        d = self.directory
        time = np.array(self._raw("time"))
        order = np.argsort(time, kind="stable")
        np.save(d / "time.npy", time[order], allow_pickle=False)
        del time
        for k in ("user", "unknown_clicks") + (("listing.file_row",) if self.listing else ()):
            np.save(d / f"{k}.npy", np.array(self._raw(k))[order], allow_pickle=False)
        if self.listing:
            ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=str)
            np.save(d / "listing.ids.npy", ids[order], allow_pickle=False)
            del ids
        # each ragged field, and the arrays aligned with its values
        ragged = [("history", []), ("candidates", ["labels"] + (["listing.candidate_slot"] if self.listing else []))]
        if self.listing:
            ragged.append(("listing.slots", []))
        for name, aligned in ragged:
            lengths = np.array(self._raw(f"{name}.lengths"))
            src = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=src[1:])
            dst = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths[order], out=dst[1:])
            del lengths
            np.save(d / f"{name}.offsets.npy", dst, allow_pickle=False)
            pairs = [(self._raw(f"{name}.values"), f"{name}.values")] + [(self._raw(k), k) for k in aligned]
            outs = [np.lib.format.open_memmap(d / f"{out}.npy", mode="w+", dtype=raw.dtype, shape=(int(dst[-1]),))
                    for raw, out in pairs]
            for a in range(0, len(order), self.PIECE):
                rows = order[a:a + self.PIECE]
                pos = ragged_positions(src[rows], src[rows + 1])
                lo, hi = int(dst[a]), int(dst[min(a + self.PIECE, len(order))])
                for (raw, _), out in zip(pairs, outs):
                    np.take(raw, pos, out=out[lo:hi], mode="clip")  # in range; "raise" would buffer the copy
                drop_pages(*[raw for raw, _ in pairs], *outs)  # the pages of this piece go back (see drop_pages)
            del outs, pairs  # unmapped unflushed: their pages are in the page cache, where mapped() reads them
        for k in self.fields:
            (d / f"{k}.raw").unlink()
        return mapped(d, users, False, self.listing)


def _runs(flags: np.ndarray):
    """(flag, start, end) of each maximal run of equal flags."""
    if not len(flags):
        return
    cuts = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(flags)]
    for a, e in zip(starts.tolist(), ends.tolist()):
        yield bool(flags[a]), a, e


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# the low n bytes of a little-endian 64-bit word: a token of n bytes read as the 8 bytes from its start
_LOW_BYTES = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


class _KeyTable:
    """Keys of 1 to 8 ASCII bytes as 64-bit words (the bytes themselves, zero-padded: two keys are equal only if
    their bytes are) mapped to values, in an open-addressing hash table numpy probes and fills for many keys at
    once; it doubles when half full."""

    def __init__(self, expected: int = 0):
        self._alloc(1 << max(10, (2 * expected).bit_length()))  # at most half full

    def _alloc(self, size: int) -> None:
        self.shift, self.mask = np.uint64(64 - size.bit_length() + 1), size - 1
        # slot k's key and value side by side in one 16-byte element (complex128 is numpy's native 16-byte type,
        # used only as a container): a lookup gathers both with one random access instead of two
        self.slots = np.zeros(size, dtype=np.complex128)
        words = self.slots.view(np.uint64)
        self.keys, self.values = words[0::2], words[1::2].view(np.int64)
        self.values[:] = -1
        self.count = 0

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        h = keys * _GOLDEN
        h >>= self.shift
        return h.view(np.int64)  # below 2**63 after the shift

    def insert(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys not in the table yet (distinct among themselves) with their values."""
        if 2 * (self.count + len(keys)) > len(self.keys):
            old = self.keys != 0
            old_keys, old_values = self.keys[old], self.values[old]
            self._alloc(1 << (2 * (self.count + len(keys))).bit_length())
            self.insert(old_keys, old_values)
        slot = self._hash(keys)
        todo = np.arange(len(keys))
        while len(todo):  # each round: every key whose slot is free, one per slot, takes it; the rest probe on
            free = todo[self.keys[slot[todo]] == 0]
            taken, first = np.unique(slot[free], return_index=True)
            self.keys[taken], self.values[taken] = keys[free[first]], values[free[first]]
            placed = np.zeros(len(keys), dtype=bool)
            placed[free[first]] = True
            todo = todo[~placed[todo]]
            slot[todo] = (slot[todo] + 1) & self.mask
        self.count += len(keys)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key; -1 where it is not in the table."""
        slot = self._hash(keys)
        pairs = np.take(self.slots, slot).view(np.uint64)  # np.take gathers faster than indexing does
        found, out = pairs[0::2], pairs[1::2].view(np.int64)
        todo = np.flatnonzero(found != keys)
        out[todo] = -1
        # a slot taken by another key: probe on (an empty slot ends the search)
        slot = slot[todo]
        go = found[todo] != 0
        todo, slot = todo[go], slot[go]
        while len(todo):
            slot = (slot + 1) & self.mask
            found = self.keys[slot]
            hit = found == keys[todo]
            out[todo[hit]] = self.values[slot[hit]]
            go = ~hit & (found != 0)
            todo, slot = todo[go], slot[go]
        return out

    @staticmethod
    def keys_at(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The keys of the tokens of 1 to 8 bytes at ``starts`` (``words``: the block's 8-byte windows, see
        :func:`_windows`)."""
        keys = words[starts]
        keys &= _LOW_BYTES[lengths]
        return keys

    def lookup(self, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return self.find(self.keys_at(words, starts, lengths))


class _IdTable(_KeyTable):
    """The news table's ids of at most 8 ASCII bytes (without blanks: a token has none) -> their news index."""

    @classmethod
    def of(cls, news: NewsTable) -> "_IdTable":
        """The table of ``news``, made once per news table and size (train and dev logs read the same table; a
        test split's news file adds ids)."""
        kept = news.__dict__.get("_id_table")
        if kept is None or kept[0] != len(news):
            kept = news.__dict__["_id_table"] = (len(news), cls(news))
        return kept[1]

    def __init__(self, news: NewsTable):
        if len(news.index) == len(news.ids):  # each id once: id k is news k
            ids, values = news.ids, np.arange(len(news.ids), dtype=np.int64)
        else:
            ids, values = list(news.index), np.fromiter(news.index.values(), dtype=np.int64, count=len(news.index))
        text = "\n".join(ids)
        raw = text.encode()
        if len(raw) != len(text):  # some ids are not ASCII: no token of a plain line is one of them
            keep = [k for k, i in enumerate(ids) if i.isascii()]
            ids, values = [ids[k] for k in keep], values[keep]
            text = "\n".join(ids)
            raw = text.encode()
        super().__init__(len(ids))
        if not ids:
            return
        buf = np.frombuffer(raw, dtype=np.uint8)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
        # an id with a blank or control byte can never be one token of a plain line
        odd = (buf <= 32) | (buf == 127)
        odd[starts[1:] - 1] = False  # the newlines between ids
        bad = np.flatnonzero(odd)
        blank = np.zeros(len(ids), dtype=bool)
        blank[np.searchsorted(starts, bad, side="right") - 1] = True
        ok = (lengths > 0) & (lengths <= 8) & ~blank
        self.insert(self.keys_at(_windows(buf), starts[ok], lengths[ok]), values[ok])


@dataclass
class _PlainLines:
    """A block's lines (byte ranges, without their newline), which of them are plain, and the plain ones' fields:
    tab positions, and their history and candidate ids and labels, line after line."""

    start: np.ndarray
    end: np.ndarray
    plain: np.ndarray  # bool per line
    tabs: np.ndarray  # [lines, 4] (rows of non-plain lines unused)
    time: np.ndarray  # seconds, per line (non-plain lines unused)
    user_key: np.ndarray  # uint64 per line: the user id's key when it is 1 to 8 bytes without blanks, else 0
    h_idx: np.ndarray
    h_at: np.ndarray  # per line + 1: offsets into h_idx (0 tokens for non-plain lines)
    c_idx: np.ndarray
    c_lab: np.ndarray
    c_at: np.ndarray

    def build(self, data: bytes, i: int, j: int, path: Path, first: int, b: _Builder, listing: bool,
              row0: int) -> Behaviors:
        """Behaviors of the plain lines i..j-1 (a run of them), users registered in file order."""
        # users met before are found by their key; the others (and ids with blanks or of 9 bytes and more) go
        # through the dictionary in file order, which numbers new users as the line-by-line reader does
        if b.user_keys is None:
            b.user_keys = _KeyTable()
        keys = self.user_key[i:j]
        user = b.user_keys.find(keys)
        index = b.user_index
        known = len(index)
        miss = np.flatnonzero(user < 0)
        if len(miss):
            t0, t1 = self.tabs[i:j, 0][miss].tolist(), self.tabs[i:j, 1][miss].tolist()
            user[miss] = [index.setdefault(data[s + 1:e].strip().decode(), len(index)) for s, e in zip(t0, t1)]
            clean = miss[keys[miss] != 0]
            new_keys, once = np.unique(keys[clean], return_index=True)
            b.user_keys.insert(new_keys, user[clean[once]])
        if len(index) > known:
            b.users.extend(reversed(list(itertools.islice(reversed(index), len(index) - known))))
        h_at, c_at = self.h_at[i:j + 1], self.c_at[i:j + 1]
        c_len = np.diff(c_at)
        lst = None
        if listing:
            ids = [data[s:e].strip().decode() or f"{path.name}:{first + i + k}"
                   for k, (s, e) in enumerate(zip(self.start[i:j].tolist(), self.tabs[i:j, 0].tolist()))]
            labels = self.c_lab[c_at[0]:c_at[-1]]
            lst = Listing(np.asarray(ids, dtype=str), row0 + np.arange(j - i, dtype=np.int64),
                          Ragged.from_lengths(c_len, labels.copy()),
                          (np.arange(c_at[-1] - c_at[0]) - np.repeat(c_at[:-1] - c_at[0], c_len)).astype(np.int32))
        return Behaviors(b.users, user.astype(np.int64), self.time[i:j].copy(),
                         Ragged.from_lengths(np.diff(h_at), self.h_idx[h_at[0]:h_at[-1]].astype(np.int32)),
                         Ragged.from_lengths(c_len, self.c_idx[c_at[0]:c_at[-1]].astype(np.int32)),
                         self.c_lab[c_at[0]:c_at[-1]].copy(), np.zeros(j - i, dtype=np.int64), listing=lst)


def _windows(buf: np.ndarray) -> np.ndarray:
    """[len(buf)] uint64: element k is the 8 bytes buf[k : k + 8] (zeros past the end), as the machine reads them
    (an unaligned view of one padded copy). Keys are little-endian, so a token's bytes are its word's low bytes."""
    if sys.byteorder != "little":
        raise NotImplementedError("the plain-line reader reads 8 bytes as a little-endian word")
    padded = np.concatenate([buf, np.zeros(8, dtype=np.uint8)])
    return np.ndarray(shape=(len(buf),), dtype=np.uint64, buffer=padded, offset=0, strides=(1,))


def _plain_lines(data: bytes, table: _IdTable, max_line_bytes: int, times: dict[str, int]) -> _PlainLines:
    """Cut a block of whole lines (joined by newlines) with numpy: which lines are plain (see _read_mind_bulk), and
    their tabs, times, ids and labels. ``times``: the stamps parsed so far (read and extended)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    # every byte that separates (tab, newline, space) or disqualifies a line (other controls, non-ASCII); tokens
    # lie between consecutive ones (a virtual one after the block ends the last)
    special = np.flatnonzero(buf.view(np.int8) <= 32)  # as signed bytes, 128..255 are negative
    kind = buf[special]
    is_nl = kind == 10
    nl_at = np.flatnonzero(is_nl)  # the newlines' places among the special bytes
    nl = special[nl_at]
    start = np.concatenate(([0], nl + 1))
    end = np.concatenate((nl, [len(buf)]))
    n = len(start)
    is_tab = kind == 9
    tab_at = np.flatnonzero(is_tab)
    tab_line = np.searchsorted(nl, special[tab_at])
    plain = (np.bincount(tab_line, minlength=n) == 4) & (end - start <= max_line_bytes)
    odd = ~(is_nl | is_tab | (kind == 32))
    if odd.any():
        plain[np.searchsorted(nl, special[odd])] = False
    lines = np.flatnonzero(plain)
    at = tab_at[plain[tab_line]].reshape(-1, 4)  # the plain lines' tabs, as places among the special bytes
    tabs = np.zeros((n, 4), dtype=np.int64)
    tabs[lines] = special[at]
    # a user id that is not all blanks: its field holds more bytes than the spaces in it
    u_size, u_blanks = tabs[lines, 1] - tabs[lines, 0] - 1, at[:, 1] - at[:, 0] - 1
    blank = u_size == u_blanks
    words = _windows(buf)
    user_key = np.zeros(n, dtype=np.uint64)
    keyed = (u_blanks == 0) & (u_size > 0) & (u_size <= 8)
    user_key[lines[keyed]] = _KeyTable.keys_at(words, tabs[lines[keyed], 0] + 1, u_size[keyed])
    # the tokens after the third tab (history, then candidates after the fourth) up to the line's end: a running
    # sum marks every special byte of that stretch with its line + 1
    last = np.concatenate((nl_at, [len(special)]))[lines]
    mark = np.zeros(len(special) + 1, dtype=np.int64)
    mark[at[:, 2]] = lines + 1
    mark[last] -= lines + 1
    region = np.cumsum(mark[:-1])
    sep = np.concatenate((special, [len(buf)]))
    gap = np.diff(sep)
    k = np.flatnonzero((region > 0) & (gap > 1))
    tok_start, tok_len, tok_line = np.take(sep, k), np.take(gap, k), np.take(region, k)
    tok_start += 1
    tok_len -= 1
    tok_line -= 1
    plain[lines[blank]] = False
    hist = tok_start < np.take(np.ascontiguousarray(tabs[:, 3]), tok_line)
    # a candidate is <id>-<0|1>: its id is its first len - 2 bytes; its last two bytes read as one little-endian
    # 16-bit word (from a token's start, one of a history id of 1 byte reads the byte before: its label is unused)
    tok_end = tok_start + tok_len
    tail = np.take(np.ndarray(shape=(max(len(buf) - 1, 0),), dtype=np.uint16, buffer=buf, strides=(1,)), tok_end - 2)
    labelled = (tail == 0x302D) | (tail == 0x312D)  # "-0", "-1"
    id_len = tok_len - 2 * ~hist
    # one lookup for both lists' ids; an id of 0 or more than 8 bytes, unknown (or glued), or a candidate without
    # its label takes -1, and its line goes to the text path, which splits and counts them
    ok = ((id_len - 1).view(np.uint64) < 8) & (hist | labelled)
    if ok.all():  # a clean block: no compaction
        idx = table.lookup(words, tok_start, id_len)
    else:
        idx = np.full(len(tok_start), -1, dtype=np.int64)
        idx[ok] = table.lookup(words, tok_start[ok], id_len[ok])
    plain[tok_line[idx < 0]] = False
    h_count = np.bincount(tok_line[hist], minlength=n)
    plain &= h_count > 0  # an empty history is a fault to count
    # the time stamps, parsed once per distinct stamp; a line whose stamp does not parse is not plain
    time = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(plain)
    seconds, read = _stamps_in_bytes(buf, tabs[rows, 1] + 1, tabs[rows, 2])
    time[rows[read]] = seconds[read]
    rows = rows[~read]  # stamps of another form (blanks around them, say), or out of range: read as text
    stamps = [data[a + 1:e].strip().decode() for a, e in zip(tabs[rows, 1].tolist(), tabs[rows, 2].tolist())]
    times.update(parse_mind_times(list(set(stamps) - times.keys())))
    when = list(map(times.__getitem__, stamps))
    if None in when:
        ok = np.array([w is not None for w in when])
        plain[rows[~ok]] = False
        rows, when = rows[ok], [w for w in when if w is not None]
    time[rows] = when
    keep = plain[tok_line]
    hk, ck = keep & hist, keep & ~hist
    h_at = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.where(plain, h_count, 0), out=h_at[1:])
    c_at = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.where(plain, np.bincount(tok_line, minlength=n) - h_count, 0), out=c_at[1:])
    c_lab = ((tail[ck] >> 8) - 48).astype(np.int8)
    return _PlainLines(start, end, plain, tabs, time, user_key, idx[hk], h_at, idx[ck], c_lab, c_at)


_TAIL, _HEAD, _LAST = operator.itemgetter(slice(-2, None)), operator.itemgetter(slice(None, -2)), operator.itemgetter(-1)
_LABEL_TAILS = {"-0", "-1"}
_NO_LABEL_CHAR = chr(ord("0") + NO_LABEL)  # "/": labels are kept as characters until one conversion at the end


class _Where:
    """``file:line`` of a chunk's rows, made only for the few that a fault names."""

    def __init__(self, path: Path, numbers: list[int]):
        self.path, self.numbers = path, numbers

    def __getitem__(self, row: int) -> str:
        return f"{self.path}:{self.numbers[row]}"


def _split_lines(path: Path, numbers: list[int], lines: list[str], b: _Builder, faults: FaultLog,
                 times: dict[str, int], labels_optional: bool, listing: bool) -> "_Chunk":
    """A chunk's lines cut into columns and tokens (ids not looked up yet); faulty lines counted and left out."""
    cols = [line.split("\t") for line in lines]
    malformed = []  # (line number, why): counted in line order once both checks below have run
    if set(map(len, cols)) != {5}:
        keep = []
        for k, c in enumerate(cols):
            if len(c) == 5:
                keep.append(k)
            else:
                malformed.append((numbers[k], f"expected 5 tab-separated columns, found {len(c)}"))
        cols, numbers = [cols[k] for k in keep], [numbers[k] for k in keep]
    if not cols:
        _count_malformed(faults, path, malformed)
        return _Chunk(wheres=_Where(path, []))
    imp_ids, users, stamps, hists, imps = (list(x) for x in zip(*cols))
    users = [u.strip() for u in users]
    stamps = [s.strip() for s in stamps]
    times.update(parse_mind_times(list(set(stamps) - times.keys())))
    when = list(map(times.get, stamps))
    if "" in users or None in when:
        keep = []
        for k, (u, t) in enumerate(zip(users, when)):
            if not u:
                malformed.append((numbers[k], "empty user id"))
            elif t is None:
                malformed.append((numbers[k], f"unparsable time {stamps[k]!r}"))
            else:
                keep.append(k)
        numbers, imp_ids, users, when, hists, imps = ([x[k] for k in keep]
                                                      for x in (numbers, imp_ids, users, when, hists, imps))
    _count_malformed(faults, path, malformed)
    chunk = _Chunk(wheres=_Where(path, numbers))
    tokens = " ".join(imps).split()
    if not tokens or (min(map(len, tokens)) > 2 and set(map(_TAIL, tokens)) <= _LABEL_TAILS):
        # every candidate <id>-<0|1>: cut in C over the whole chunk
        chunk.c_tok = list(map(_HEAD, tokens))
        chunk.c_lab = list(map(_LAST, tokens))
        chunk.c_len = list(map(len, map(str.split, imps)))
    else:
        for k, text in enumerate(imps):
            n = 0
            for x in text.split():
                if len(x) > 2 and x[-2] == "-" and x[-1] in "01":
                    chunk.c_tok.append(x[:-2])
                    chunk.c_lab.append(x[-1])
                elif labels_optional:
                    chunk.c_tok.append(x)
                    chunk.c_lab.append(_NO_LABEL_CHAR)
                else:
                    faults.fault("bad_impression_tokens", f"{path}:{numbers[k]}",
                                 f"impression token {x!r} is not <news_id>-<0|1>")
                    continue
                n += 1
            chunk.c_len.append(n)
    chunk.h_tok = " ".join(hists).split()
    chunk.h_len = list(map(len, map(str.split, hists)))
    index = b.user_index
    known = len(index)
    chunk.user = [index.setdefault(u, len(index)) for u in users]
    if len(index) > known:  # the new users, in the order they came
        b.users.extend(reversed(list(itertools.islice(reversed(index), len(index) - known))))
    chunk.time = when
    if listing:
        chunk.ids = [i.strip() or f"{path.name}:{n}" for i, n in zip(imp_ids, numbers)]
    return chunk


def _count_malformed(faults: FaultLog, path: Path, malformed: list[tuple[int, str]]) -> None:
    for number, why in sorted(malformed, key=lambda m: m[0]):
        faults.fault("malformed_rows", f"{path}:{number}", why)


@dataclass
class _Chunk:
    """Lines split but not looked up yet."""

    user: list = field(default_factory=list)
    time: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    wheres: "_Where | list" = field(default_factory=list)
    h_tok: list = field(default_factory=list)
    h_len: list = field(default_factory=list)
    c_tok: list = field(default_factory=list)
    c_lab: list = field(default_factory=list)
    c_len: list = field(default_factory=list)

    def build(self, b: _Builder, faults: FaultLog, listing: bool, row0: int) -> Behaviors:
        n_rows, wheres = len(self.user), self.wheres
        # glued ids are counted after both lists are looked up, in the line-by-line reader's order (by line, its
        # history before its candidates, token by token)
        labels_listed = (np.frombuffer("".join(self.c_lab).encode(), dtype=np.uint8).astype(np.int16)
                         - ord("0")).astype(np.int8)
        c_len_listed = np.asarray(self.c_len, dtype=np.int64)
        deferred = b.faults = _Deferred()
        try:
            h_idx, h_len, h_place, h_names = _bulk_lookup(b, self.h_tok, np.asarray(self.h_len, dtype=np.int64),
                                                          wheres, 0)
            c_idx, c_len, c_place, c_names = _bulk_lookup(b, self.c_tok, c_len_listed, wheres, 1)
        finally:
            b.faults = faults
        deferred.emit(faults)
        c_labels = np.repeat(labels_listed, np.bincount(c_place, minlength=len(self.c_tok)))  # pieces share it
        # unknown ids, counted per line (history first, then candidates) as the line-by-line reader counts them
        h_rows = np.repeat(np.arange(n_rows), h_len)
        c_rows = np.repeat(np.arange(n_rows), c_len)
        h_known, c_known = h_idx >= 0, c_idx >= 0
        _count_unknown(faults, wheres, h_rows[~h_known], c_rows[~c_known], h_names, c_names,
                       np.flatnonzero(~h_known), np.flatnonzero(~c_known))
        h_kept = np.bincount(h_rows[h_known], minlength=n_rows)
        empty = np.flatnonzero(h_kept == 0)
        for r in empty[: faults.max_examples]:
            faults.fault("empty_histories", wheres[r], "the user history is empty")
        if len(empty) > faults.max_examples:
            faults.counts["empty_histories"] += len(empty) - faults.max_examples
        unknown_clicks = np.bincount(c_rows[~c_known], weights=(c_labels[~c_known] == 1),
                                     minlength=n_rows).astype(np.int64)
        lst = None
        if listing:
            within = c_place - np.repeat(np.cumsum(c_len_listed) - c_len_listed, c_len)  # listed place in its line
            lst = Listing(np.asarray(self.ids, dtype=str), row0 + np.arange(n_rows, dtype=np.int64),
                          Ragged.from_lengths(c_len_listed, labels_listed), within[c_known].astype(np.int32))
        return Behaviors(b.users, np.asarray(self.user, dtype=np.int64), np.asarray(self.time, dtype=np.int64),
                         Ragged.from_lengths(h_kept.astype(np.int64), h_idx[h_known].astype(np.int32)),
                         Ragged.from_lengths(np.bincount(c_rows[c_known], minlength=n_rows).astype(np.int64),
                                             c_idx[c_known].astype(np.int32)),
                         c_labels[c_known].astype(np.int8), unknown_clicks, listing=lst)


def _cat_ragged(parts: list[Ragged]) -> Ragged:
    return Ragged.from_lengths(np.concatenate([p.lengths() for p in parts]), np.concatenate([p.values for p in parts]))


def _concat_behaviors(parts: list[Behaviors]) -> Behaviors:
    """Behaviors of consecutive chunks of one read, as one."""
    lst = None
    if parts[0].listing is not None:
        ls = [p.listing for p in parts]
        lst = Listing(np.concatenate([x.ids for x in ls]), np.concatenate([x.file_row for x in ls]),
                      _cat_ragged([x.slots for x in ls]), np.concatenate([x.candidate_slot for x in ls]))
    return Behaviors(parts[0].users, np.concatenate([p.user for p in parts]), np.concatenate([p.time for p in parts]),
                     _cat_ragged([p.history for p in parts]), _cat_ragged([p.candidates for p in parts]),
                     np.concatenate([p.labels for p in parts]), np.concatenate([p.unknown_clicks for p in parts]),
                     listing=lst)


class _Deferred:
    """Faults recorded with a sort key (``key`` at the time of the call) and counted later in that order."""

    def __init__(self):
        self.items: list[tuple] = []
        self.key: tuple = ()

    def fault(self, *args, **kw) -> None:
        self.items.append((self.key, len(self.items), args, kw))

    def emit(self, faults: FaultLog) -> None:
        for _, _, args, kw in sorted(self.items, key=lambda x: (x[0], x[1])):
            faults.fault(*args, **kw)


def _bulk_lookup(b: _Builder, tokens: list[str], lengths: np.ndarray, wheres: list[str], kind: int = 0):
    """Indices of the tokens of every line (lengths per line), glued ids split into their pieces: (indices [P],
    pieces per line [R], the listed token each piece came from [P], each piece's text [P])."""
    get = b.news.index.get
    idx = np.fromiter(map(get, tokens, itertools.repeat(-1)), dtype=np.int64, count=len(tokens))
    place = np.arange(len(tokens), dtype=np.int64)
    widths = b._widths
    unknown = np.flatnonzero(idx < 0)
    if not widths or not len(unknown):
        return idx, lengths, place, tokens
    # only an unknown token whose length is no id length, and at least two ids long, may be glued
    sizes = np.fromiter(map(len, map(tokens.__getitem__, unknown.tolist())), dtype=np.int64, count=len(unknown))
    maybe = unknown[~np.isin(sizes, widths) & (sizes >= 2 * widths[0])]
    if not len(maybe):
        return idx, lengths, place, tokens
    rows = np.repeat(np.arange(len(lengths)), lengths)
    pieces, texts = {}, {}
    for i in maybe:
        if isinstance(b.faults, _Deferred):
            b.faults.key = (int(rows[i]), kind, int(i))
        split = b.split_glued(tokens[i], wheres[rows[i]])
        if len(split) > 1:
            pieces[int(i)] = np.fromiter((get(p, -1) for p in split), dtype=np.int64, count=len(split))
            texts[int(i)] = split
    if not pieces:
        return idx, lengths, place, tokens
    counts = np.ones(len(tokens), dtype=np.int64)
    for i, v in pieces.items():
        counts[i] = len(v)
    out = np.repeat(idx, counts)
    starts = np.cumsum(counts) - counts
    for i, v in pieces.items():
        out[starts[i]:starts[i] + len(v)] = v
    names = [p for i, tok in enumerate(tokens) for p in texts.get(i, (tok,))]
    return (out, np.bincount(rows, weights=counts, minlength=len(lengths)).astype(np.int64), np.repeat(place, counts),
            names)


def _count_unknown(faults: FaultLog, wheres: list[str], h_rows, c_rows, h_tok, c_tok, h_place, c_place) -> None:
    """unknown_news_ids as the line-by-line reader counts it: one fault per line and list (history, then
    candidates) with that list's unknown ids, naming its first (``*_tok[*_place]``: the unknown ids' texts, glued
    ids' pieces included); the first few kept as examples."""
    events = []  # (row, list, first unknown token, count)
    for rows, toks, place, kind in ((h_rows, h_tok, h_place, 0), (c_rows, c_tok, c_place, 1)):
        if len(rows):
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            counts = np.diff(np.r_[starts, len(rows)])
            events.extend(zip(rows[starts].tolist(), [kind] * len(starts), place[starts].tolist(), counts.tolist()))
    events.sort(key=lambda e: (e[0], e[1]))
    total = 0
    for k, (row, kind, first, n) in enumerate(events):
        if k < faults.max_examples:
            tok = (h_tok if kind == 0 else c_tok)[first]
            faults.fault("unknown_news_ids", wheres[row], f"news id {tok!r} is not in the news table", n)
        else:
            total += n
    faults.counts["unknown_news_ids"] += total


def _split_ids(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(";")) if t]


def read_speedyrec_train(paths: list[Path], news: NewsTable, faults: FaultLog, max_line_bytes: int,
                         history_cap: int) -> Behaviors:
    """SpeedyRec training logs: ``user_id \\t pos;pos&neg;neg|pos;pos&neg;neg|...`` in time order.

    Each line is one user record (the same user id in two shard files are two records). The
    history of an impression is the user's earlier clicks in the record (the last ``history_cap``).
    """
    b = _Builder(news, faults)
    for path in paths:
        for lineno, line in read_rows(path, faults, max_line_bytes):
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            if len(cols) != 2:
                faults.fault("malformed_rows", where, f"expected 2 tab-separated columns (user, impressions), found {len(cols)}")
                continue
            user_id = cols[0].strip()
            if not user_id:
                faults.fault("malformed_rows", where, "empty user id")
                continue
            user = b.user_id(f"{path.name}:{user_id}")
            clicked: list[np.ndarray] = []
            n_clicked = 0
            for k, imp in enumerate(s for s in cols[1].split("|") if s.strip()):
                parts = imp.split("&")
                if len(parts) != 2:
                    faults.fault("bad_impression_tokens", where, f"impression {k} has {len(parts) - 1} '&' separators, expected 1")
                    continue
                pos, pos_known = b.lookup(_split_ids(parts[0]), where)
                neg, neg_known = b.lookup(_split_ids(parts[1]), where)
                hist = np.concatenate(clicked)[-history_cap:] if n_clicked else np.zeros(0, dtype=np.int64)
                cand = np.concatenate([pos[pos_known], neg[neg_known]])
                labels = np.concatenate([np.ones(int(pos_known.sum())), np.zeros(int(neg_known.sum()))])
                b.add(user, k, hist, cand, labels, int((~pos_known).sum()), where)
                clicked.append(pos[pos_known])
                n_clicked += int(pos_known.sum())
    beh = b.build()
    beh.history_is_prefix = True
    return beh


def read_speedyrec_test(paths: list[Path], news: NewsTable, faults: FaultLog, max_line_bytes: int) -> Behaviors:
    """SpeedyRec test impressions: ``user_id \\t history(;) \\t clicked(;) \\t non-clicked(;)``; the listing
    names each impression ``<file>:<line>`` and lists its clicked news, then its non-clicked ones."""
    b = _Builder(news, faults, listing=True)
    for path in paths:
        for lineno, line in read_rows(path, faults, max_line_bytes):
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            if len(cols) != 4:
                faults.fault("malformed_rows", where, f"expected 4 tab-separated columns, found {len(cols)}")
                continue
            user = b.user_id(f"{path.name}:{cols[0].strip()}")
            hist, hk = b.lookup(_split_ids(cols[1]), where)
            pos, neg = _split_ids(cols[2]), _split_ids(cols[3])
            slot_labels = [1] * len(pos) + [0] * len(neg)
            cand, known, (labels, places) = b.lookup_listed(pos + neg, slot_labels, where)
            b.add(user, lineno, hist[hk], cand[known], labels[known], int((labels[~known] == 1).sum()), where,
                  (f"{path.name}:{lineno}", slot_labels, places[known]))
    return b.build()
