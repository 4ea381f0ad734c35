"""Counting bad input: every skipped or repaired piece of data lands in a named counter."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger("speedyrec.data")

# What each counter means, for the one-line summary and for stats.json readers.
FAULT_REASONS = {
    "malformed_rows": "rows skipped: wrong column count or unparsable field",
    "bad_impression_tokens": "impression tokens skipped: not of the form <news_id>-<0|1>",
    "glued_ids": "tokens made of several ids with a missing separator, split into their ids",
    "unknown_news_ids": "news ids not in the news table (dropped, never aliased)",
    "clicks_unknown_news": "training clicks on unknown news (not trainable)",
    "duplicate_news_ids": "news rows whose id was already defined (first row kept)",
    "empty_titles": "news with an empty title",
    "empty_histories": "impressions whose user history is empty",
    "invalid_utf8_rows": "rows with invalid UTF-8 (bad bytes replaced)",
    "overlong_rows": "lines longer than data.max_line_bytes (skipped)",
    "duplicate_users": "users listed again in a per-user file (first line kept)",
}


class DataError(ValueError):
    """Bad input under data.strict=true, or input that cannot be used at all."""


@dataclass
class FaultLog:
    """Counters of bad input, with the first few places each occurred.

    In strict mode the first fault raises a DataError naming file:line and the reason.
    """

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    max_examples: int = 3

    def fault(self, counter: str, where: str, reason: str, n: int = 1) -> None:
        assert counter in FAULT_REASONS, counter
        if self.strict:
            raise DataError(f"{where}: {reason}")
        self.counts[counter] += n
        ex = self.examples.setdefault(counter, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {reason}")

    def summary(self) -> str:
        parts = []
        for counter, n in sorted(self.counts.items()):
            if n:
                first = self.examples.get(counter, [""])[0]
                parts.append(f"{n:,} {counter}" + (f" (first: {first})" if first else ""))
        return "; ".join(parts)

    def warn(self) -> None:
        """Emit one warning that summarises all faults (nothing when the data was clean)."""
        text = self.summary()
        if text:
            log.warning("data faults (counted in stats.json): %s", text)

    def as_dict(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in FAULT_REASONS}


def read_rows(path: Path, faults: FaultLog, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for every non-blank line of a UTF-8 text file.

    Lines over ``max_line_bytes`` are skipped and counted; invalid UTF-8 is replaced and counted.
    The trailing newline (and a Windows carriage return) is stripped, a leading BOM removed.
    """
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded pieces
                    raw = f.readline(max_line_bytes)
                faults.fault("overlong_rows", f"{path}:{lineno}", f"line longer than {max_line_bytes} bytes")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                faults.fault("invalid_utf8_rows", f"{path}:{lineno}", f"invalid UTF-8 at byte {e.start}")
                text = raw.decode("utf-8", errors="replace")
            yield lineno, text
