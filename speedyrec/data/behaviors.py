"""Impression logs: one row per impression, histories and candidates as news indices (CSR)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speedyrec.data.faults import FaultLog, read_rows
from speedyrec.data.news import NewsTable
from speedyrec.data.ragged import Ragged

_IMPRESSION_TOKEN = re.compile(r"^(\S+)-([01])$")


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

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> "Behaviors":
        rows = np.asarray(rows, dtype=np.int64)
        cand = self.candidates.take(rows)
        label_rows = Ragged(self.candidates.offsets, self.labels).take(rows)
        return Behaviors(self.users, self.user[rows], self.time[rows], self.history.take(rows), cand,
                         label_rows.values, self.unknown_clicks[rows], self.history_is_prefix)

    def clicks(self) -> int:
        return int(self.labels.sum())

    def non_clicked(self) -> Ragged:
        """Per impression, its non-clicked candidates (the pool negatives are drawn from first)."""
        neg = self.labels == 0
        return Ragged.from_lengths(np.bincount(self.candidates.row_ids()[neg], minlength=len(self)),
                                   self.candidates.values[neg])


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
    _widths: tuple = ()

    def __post_init__(self):
        self._widths = tuple(sorted({len(i) for i in self.news.ids}))

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
        ids: list[str] = []
        for t in tokens:
            ids.extend(self.split_glued(t, where))
        idx = self.news.lookup(ids)
        known = idx >= 0
        n_unknown = int((~known).sum())
        if n_unknown:
            first = ids[int(np.argmin(known))]
            self.faults.fault("unknown_news_ids", where, f"news id {first!r} is not in the news table", n_unknown)
        return idx, known

    def add(self, user: int, time: int, history: np.ndarray, cand: np.ndarray, labels: np.ndarray,
            unknown_clicks: int, where: str) -> None:
        if len(history) == 0:
            self.faults.fault("empty_histories", where, "the user history is empty")
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


def read_mind_behaviors(paths: list[Path], news: NewsTable, faults: FaultLog, max_line_bytes: int) -> Behaviors:
    """MIND ``behaviors.tsv``: impression_id, user_id, time, history (ids), impressions (id-label).

    Rows are sorted by time (stable) after reading.
    """
    b = _Builder(news, faults)
    for path in paths:
        for lineno, line in read_rows(path, faults, max_line_bytes):
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            if len(cols) != 5:
                faults.fault("malformed_rows", where, f"expected 5 tab-separated columns, found {len(cols)}")
                continue
            _, user_id, time_text, history_text, imp_text = cols
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
            cand_ids, labels = [], []
            for tok in imp_text.split():
                m = _IMPRESSION_TOKEN.match(tok)
                if m is None:
                    faults.fault("bad_impression_tokens", where, f"impression token {tok!r} is not <news_id>-<0|1>")
                    continue
                pieces = b.split_glued(m.group(1), where)
                cand_ids.extend(pieces)
                labels.extend([int(m.group(2))] * len(pieces))
            cand, known = b.lookup(cand_ids, where)
            labels = np.asarray(labels, dtype=np.int8)
            unknown_clicks = int(labels[~known].sum())
            b.add(b.user_id(user_id), t, hist, cand[known], labels[known], unknown_clicks, where)
    beh = b.build()
    order = np.argsort(beh.time, kind="stable")
    return beh.take(order) if len(order) else beh


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
    """SpeedyRec test impressions: ``user_id \\t history(;) \\t clicked(;) \\t non-clicked(;)``."""
    b = _Builder(news, faults)
    for path in paths:
        for lineno, line in read_rows(path, faults, max_line_bytes):
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            if len(cols) != 4:
                faults.fault("malformed_rows", where, f"expected 4 tab-separated columns, found {len(cols)}")
                continue
            user = b.user_id(f"{path.name}:{cols[0].strip()}")
            hist, hk = b.lookup(_split_ids(cols[1]), where)
            pos, pk = b.lookup(_split_ids(cols[2]), where)
            neg, nk = b.lookup(_split_ids(cols[3]), where)
            cand = np.concatenate([pos[pk], neg[nk]])
            labels = np.concatenate([np.ones(int(pk.sum())), np.zeros(int(nk.sum()))])
            b.add(user, lineno, hist[hk], cand, labels, int((~pk).sum()), where)
    return b.build()
