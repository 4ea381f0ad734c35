"""The news table: id <-> index, categories and text fields, read from MIND or SpeedyRec files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speedyrec.data.faults import FaultLog, read_rows

TEXT_FIELDS = ("title", "abstract", "body")


@dataclass
class NewsTable:
    """All known news. Index i is the news' row in every array and in the token store."""

    ids: list[str] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    subcategory: list[str] = field(default_factory=list)
    text: dict[str, list[str]] = field(default_factory=lambda: {f: [] for f in TEXT_FIELDS})
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, news_id: str, category: str, subcategory: str, title: str, abstract: str, body: str) -> int:
        i = len(self.ids)
        self.index[news_id] = i
        self.ids.append(news_id)
        self.category.append(category)
        self.subcategory.append(subcategory)
        self.text["title"].append(title)
        self.text["abstract"].append(abstract)
        self.text["body"].append(body)
        return i

    def lookup(self, news_ids: list[str]) -> np.ndarray:
        """Indices of the given ids; -1 for an unknown id (never another news)."""
        get = self.index.get
        return np.fromiter((get(n, -1) for n in news_ids), dtype=np.int64, count=len(news_ids))

    def id_width(self) -> int:
        """The common length of all ids, or 0 when ids differ in length (used to split glued ids)."""
        widths = {len(i) for i in self.ids}
        return widths.pop() if len(widths) == 1 else 0


def _add_row(table: NewsTable, faults: FaultLog, where: str, news_id: str, cat: str, sub: str, title: str,
             abstract: str, body: str) -> None:
    if not news_id or any(c.isspace() for c in news_id):
        faults.fault("malformed_rows", where, f"invalid news id {news_id!r}")
        return
    if news_id in table.index:
        faults.fault("duplicate_news_ids", where, f"news id {news_id} defined again")
        return
    if not title.strip():
        faults.fault("empty_titles", where, f"news {news_id} has an empty title")
    table.add(news_id, cat, sub, title.strip(), abstract.strip(), body.strip())


def read_mind_news(path: Path, table: NewsTable, faults: FaultLog, max_line_bytes: int) -> None:
    """MIND ``news.tsv``: id, category, subcategory, title, abstract[, url, title_entities, abstract_entities].

    Rows with fewer than 4 or more than 8 columns are malformed. Ids already in ``table`` are skipped
    silently when the row is identical in id (MIND's train and dev news files overlap).
    """
    for lineno, line in read_rows(path, faults, max_line_bytes):
        cols = line.split("\t")
        where = f"{path}:{lineno}"
        if not 4 <= len(cols) <= 8:
            faults.fault("malformed_rows", where, f"expected 4 to 8 tab-separated columns, found {len(cols)}")
            continue
        news_id = cols[0].strip()
        if news_id in table.index and table.text["title"][table.index[news_id]] == cols[3].strip():
            continue  # the same news listed in another split's news file
        abstract = cols[4] if len(cols) > 4 else ""
        _add_row(table, faults, where, news_id, cols[1].strip(), cols[2].strip(), cols[3], abstract, "")


def read_bodies(path: Path, table: NewsTable, faults: FaultLog, max_line_bytes: int) -> None:
    """``bodies.tsv``: news_id \\t body. Bodies of unknown news are counted and ignored."""
    body = table.text["body"]
    for lineno, line in read_rows(path, faults, max_line_bytes):
        cols = line.split("\t")
        where = f"{path}:{lineno}"
        if len(cols) != 2:
            faults.fault("malformed_rows", where, f"expected 2 tab-separated columns (news_id, body), found {len(cols)}")
            continue
        i = table.index.get(cols[0].strip(), -1)
        if i < 0:
            faults.fault("unknown_news_ids", where, f"body for unknown news id {cols[0].strip()!r}")
            continue
        body[i] = cols[1].strip()


def read_doc_features(path: Path, table: NewsTable, faults: FaultLog, max_line_bytes: int) -> None:
    """SpeedyRec ``DocFeatures.tsv``: id, category, subcategory, title, abstract, body."""
    for lineno, line in read_rows(path, faults, max_line_bytes):
        cols = line.split("\t")
        where = f"{path}:{lineno}"
        if len(cols) != 6:
            faults.fault("malformed_rows", where, f"expected 6 tab-separated columns, found {len(cols)}")
            continue
        news_id = cols[0].strip()
        if news_id in table.index and table.text["title"][table.index[news_id]] == cols[3].strip():
            continue
        _add_row(table, faults, where, news_id, cols[1].strip(), cols[2].strip(), cols[3], cols[4], cols[5])
