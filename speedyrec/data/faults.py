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
            text = _line_text(path, lineno, raw.rstrip(b"\n"), faults)
            if text is not None:
                yield lineno, text


def _line_text(path: Path, lineno: int, raw: bytes, faults: FaultLog) -> str | None:
    """One line without its newline: its carriage returns stripped, None when blank, invalid UTF-8 replaced and
    counted."""
    raw = raw.rstrip(b"\r")
    if not raw.strip():
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        faults.fault("invalid_utf8_rows", f"{path}:{lineno}", f"invalid UTF-8 at byte {e.start}")
        return raw.decode("utf-8", errors="replace")


def read_line_bytes(path: Path, max_line_bytes: int, block_bytes: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """A file's whole lines in blocks: (number of the block's first line, its lines joined by newlines, without the
    last newline); nothing decoded, checked or counted yet (:func:`block_rows` does that). A line that outgrows
    ``max_line_bytes`` before its newline keeps only its first ``max_line_bytes + 1`` bytes: enough to be counted
    as overlong."""
    with open(path, "rb") as f:
        lineno, carry = 0, b""
        while True:
            data = f.read(block_bytes)
            if not data:
                if carry:
                    yield lineno + 1, carry
                return
            data = carry + data
            cut = data.rfind(b"\n")
            if cut < 0:  # no line ends in it yet; an overlong one keeps only enough of itself to be counted
                carry = data[: max_line_bytes + 1]
                continue
            block, carry = data[:cut], data[cut + 1:]
            if len(carry) > max_line_bytes:
                carry = carry[: max_line_bytes + 1]
            yield lineno + 1, block
            lineno += block.count(b"\n") + 1


_BLANK = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: a line of only these is blank


def block_rows(path: Path, faults: FaultLog, max_line_bytes: int, numbers, raws: list[bytes]):
    """(line numbers, texts) of the non-blank lines among ``raws`` (lines without their newline, numbered
    ``numbers``), skipped, repaired and counted as read_rows does. A BOM goes from line 1, once the line's length
    was checked with it."""
    overlong = any(len(r) > max_line_bytes for r in raws)
    bom = len(numbers) > 0 and numbers[0] == 1
    if bom and raws and raws[0].startswith(b"\xef\xbb\xbf") and len(raws[0]) <= max_line_bytes:
        raws = [raws[0][3:], *raws[1:]]
    if not overlong:
        try:
            block = b"\n".join(raws).decode("utf-8")
        except UnicodeDecodeError:
            block = None
        if block is not None:
            texts = block.split("\n")
            if "\r" in block:
                texts = [t.rstrip("\r") for t in texts]
            if all(texts) and not any(map(str.isspace, texts)):  # no blank line (checked in C)
                return list(numbers), texts
            keep = [k for k, t in enumerate(texts) if t.strip(_BLANK)]
            return [numbers[k] for k in keep], [texts[k] for k in keep]
    out_n, out_t = [], []
    for n, raw in zip(numbers, raws):
        if len(raw) > max_line_bytes:
            faults.fault("overlong_rows", f"{path}:{n}", f"line longer than {max_line_bytes} bytes")
            continue
        text = _line_text(path, n, raw, faults)
        if text is not None:
            out_n.append(n)
            out_t.append(text)
    return out_n, out_t
