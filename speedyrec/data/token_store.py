"""Tokenize every news once into a compact, memory-mapped store.

Layout per text field: one flat int32 array of content tokens (no special tokens, cut to the
field's maximum minus the two specials) and int64 row offsets. A store is keyed by the field's
content, the tokenizer and the maximum length, and is rebuilt whenever any of them changes.
Batches are assembled from it with vectorised index arithmetic; there is no Python object per token.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speedyrec.data.ragged import ragged_positions

STORE_VERSION = 1
_CHUNK = 4096


def text_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace"))
        h.update(b"\x00")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A stable fingerprint of a tokenizer's vocabulary and rules."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time settings that the last call left behind
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
        h.update(str(getattr(tokenizer, name, None)).encode())
    return h.hexdigest()


@dataclass
class FieldTokens:
    """Content tokens of one field for every news: row i is ``tokens[offsets[i]:offsets[i+1]]``."""

    tokens: np.ndarray  # int32, memory-mapped
    offsets: np.ndarray  # int64 [N + 1]
    max_tokens: int  # the field's maximum length including [CLS] and [SEP]
    counts: np.ndarray | None = None  # refined fields: per token, its word's count in the raw text (>= 1)

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        return self.offsets[idx + 1] - self.offsets[idx]


def _tokenize_field(tokenizer, texts: list[str], max_content: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.zeros(len(texts), dtype=np.int64)
    chunks = []
    for start in range(0, len(texts), _CHUNK):
        # Each word yields at least one token, so cutting a text to 2*max_content words never changes
        # the first max_content tokens and spares tokenizing the rest of long bodies.
        part = [" ".join(t.split()[: 2 * max_content]) for t in texts[start : start + _CHUNK]]
        enc = tokenizer(part, add_special_tokens=False, truncation=True, max_length=max_content)["input_ids"]
        for j, ids in enumerate(enc):
            lengths[start + j] = len(ids)
        chunks.append(np.fromiter((t for ids in enc for t in ids), dtype=np.int32))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return tokens, offsets


def build_or_load_field(cache_dir: Path, field: str, texts: list[str], tokenizer, max_tokens: int,
                        tok_digest: str | None = None, refine: dict | None = None) -> tuple[FieldTokens, bool]:
    """Return the field's tokens from the cache, building them first when the key has changed.

    ``refine``: content refinement instead of the raw text, ``{"topk": k, "fit": bool mask of the news whose
    texts fit the BM25 IDF (the training news)}``; the store then also holds each token's word count.
    Returns (tokens, built) where ``built`` says whether the store was (re)built.
    """
    tok_digest = tok_digest or tokenizer_digest(tokenizer)
    key_parts = {"v": STORE_VERSION, "field": field, "text": text_digest(texts), "tok": tok_digest,
                 "max": max_tokens, "n": len(texts)}
    if refine is not None:
        fit = np.asarray(refine["fit"], dtype=bool)
        key_parts["refine"] = {"topk": refine["topk"], "fit": hashlib.sha256(np.packbits(fit).tobytes()).hexdigest()}
    key_src = json.dumps(key_parts)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    d = Path(cache_dir) / "tokens" / (f"{field}-{key}" if refine is None else f"{field}-refined-{key}")
    built = False
    if not (d / "done").exists():
        counts = None
        if refine is None:
            tokens, offsets = _tokenize_field(tokenizer, texts, max_tokens - 2)
        else:
            from speedyrec.data.refine import BM25Refiner, tokenize_refined

            refiner = BM25Refiner().fit([t for t, f in zip(texts, fit) if f])
            bags = refiner.refine_many(texts, refine["topk"])
            tokens, counts, offsets = tokenize_refined(tokenizer, bags, max_tokens - 2)
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "tokens.npy", tokens.astype(np.int32))
        np.save(tmp / "offsets.npy", offsets)
        if counts is not None:
            np.save(tmp / "counts.npy", counts.astype(np.int8))
        (tmp / "key.json").write_text(key_src)
        (tmp / "done").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            os.replace(tmp, d)
        except OSError:  # another process finished the same store first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        built = True
    tokens = np.load(d / "tokens.npy", mmap_mode="r")
    offsets = np.load(d / "offsets.npy", mmap_mode="r")
    counts = np.load(d / "counts.npy", mmap_mode="r") if (d / "counts.npy").exists() else None
    assert len(offsets) == len(texts) + 1
    return FieldTokens(tokens, offsets, max_tokens, counts), built


@dataclass
class TokenBatch:
    """Padded token ids of N news; ``mask`` is True on real tokens."""

    input_ids: np.ndarray  # int64 [N, T] (or [N, S, T] for segments)
    mask: np.ndarray  # bool, same shape
    counts: np.ndarray | None = None  # int64, same shape: word counts of refined tokens (0 = special or padding)

    @property
    def valid_tokens(self) -> int:
        return int(self.mask.sum())


class TokenStore:
    """All fields of all news, tokenized; assembles padded encoder inputs for any list of news."""

    def __init__(self, fields: dict[str, FieldTokens], cls_id: int, sep_id: int, pad_id: int):
        assert fields, "at least one text field"
        self.fields = fields
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        n = {len(f.offsets) - 1 for f in fields.values()}
        assert len(n) == 1
        self.num_news = n.pop()

    def digest(self) -> str:
        """A fingerprint of every token of every news and of the special ids (keys derived stores: teacher banks)."""
        h = hashlib.sha256(f"{self.cls_id}|{self.sep_id}|{self.pad_id}".encode())
        for name in sorted(self.fields):
            f = self.fields[name]
            h.update(f"|{name}|{f.max_tokens}|".encode())
            h.update(np.ascontiguousarray(f.offsets).tobytes())
            h.update(np.ascontiguousarray(f.tokens).tobytes())
            if f.counts is not None:
                h.update(np.ascontiguousarray(f.counts).tobytes())
        return h.hexdigest()

    @property
    def max_len(self) -> int:
        """Length of the concatenated input of a news with every field full."""
        return 1 + sum(f.max_tokens - 1 for f in self.fields.values())

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        """Concatenated input length of each news, specials included (int64 [N])."""
        idx = np.asarray(idx, dtype=np.int64)
        total = np.ones(len(idx), dtype=np.int64)
        for f in self.fields.values():
            total += f.lengths(idx) + 1
        return total

    def concat(self, idx: np.ndarray, width: int | None = None) -> TokenBatch:
        """``[CLS] field1 [SEP] field2 [SEP] ...`` for each news, padded to ``width`` (default: the longest).

        A negative index is a padding slot: it gets ``[CLS] [SEP]`` so that it can run through an encoder
        (dense baselines do), and it counts as padding, never as another news.
        """
        idx = np.asarray(idx, dtype=np.int64)
        missing = idx < 0
        if missing.any():
            width = width if width is not None else int(self.lengths(idx[~missing]).max(initial=2))
            out = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            out[:, 0], out[:, 1] = self.cls_id, self.sep_id
            mask = np.zeros((len(idx), width), dtype=bool)
            mask[:, :2] = True
            real = self.concat(idx[~missing], width)
            out[~missing], mask[~missing] = real.input_ids, real.mask
            counts = None
            if real.counts is not None:
                counts = np.zeros((len(idx), width), dtype=np.int64)
                counts[~missing] = real.counts
            return TokenBatch(out, mask, counts)
        n = len(idx)
        lengths = self.lengths(idx)
        width = int(lengths.max(initial=1)) if width is None else width
        assert (lengths <= width).all(), "width below the longest news"
        out = np.full((n, width), self.pad_id, dtype=np.int64)
        counts = np.zeros((n, width), dtype=np.int64) if self.has_counts else None
        out[:, 0] = self.cls_id
        col = np.ones(n, dtype=np.int64)
        rows_all = np.arange(n)
        for f in self.fields.values():
            starts = f.offsets[idx]
            ln = f.offsets[idx + 1] - starts
            src = ragged_positions(starts, starts + ln)
            rows = np.repeat(rows_all, ln)
            within = src - np.repeat(starts, ln)
            out[rows, col[rows] + within] = f.tokens[src]
            if counts is not None and f.counts is not None:
                counts[rows, col[rows] + within] = f.counts[src]
            col += ln
            out[rows_all, col] = self.sep_id
            col += 1
        mask = np.arange(width)[None, :] < col[:, None]
        return TokenBatch(out, mask, counts)

    @property
    def has_counts(self) -> bool:
        return any(f.counts is not None for f in self.fields.values())

    def _segment_spans(self, idx: np.ndarray, fields: list[str]) -> list[tuple[FieldTokens, np.ndarray, np.ndarray]]:
        """For each segment: (field, first content token, content length) per news.

        A field named k times is cut into k consecutive parts of ceil((max_tokens - 2) / k) content tokens,
        so a long body can fill several segments; a part beyond the end of the text is empty (absent).
        """
        spans = []
        seen: dict[str, int] = {}
        for name in fields:
            f = self.fields[name]
            k, i = fields.count(name), seen.get(name, 0)
            seen[name] = i + 1
            part = -(-(f.max_tokens - 2) // k)
            starts, ends = f.offsets[idx], f.offsets[idx + 1]
            lo = np.minimum(starts + i * part, ends)
            spans.append((f, lo, np.minimum(ends, lo + part) - lo))
        return spans

    def segment_width(self, fields: list[str]) -> int:
        """The widest a segment of this layout can be, specials included."""
        return max(-(-(self.fields[f].max_tokens - 2) // fields.count(f)) + 2 for f in fields)

    def segment_lengths(self, idx: np.ndarray, fields: list[str]) -> np.ndarray:
        """Length of each segment ``[CLS] part [SEP]`` (int64 [N, S]); 0 for an empty part (segment absent)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.zeros((len(idx), len(fields)), dtype=np.int64)
        for j, (_, _, ln) in enumerate(self._segment_spans(idx, fields)):
            out[:, j] = np.where(ln > 0, ln + 2, 0)
        return out

    def segments(self, idx: np.ndarray, fields: list[str], width: int | None = None) -> TokenBatch:
        """Each field of each news as its own segment ``[CLS] field [SEP]`` -> ids and mask [N, S, T]; a field
        listed k times is cut into k consecutive segments (see :meth:`_segment_spans`).

        An empty field gives an absent segment (all-False mask); a news with every field empty keeps its first
        segment as ``[CLS] [SEP]``, so every news has at least one segment. ``width`` defaults to the longest.
        """
        idx = np.asarray(idx, dtype=np.int64)
        n, s = len(idx), len(fields)
        seg_len = self.segment_lengths(idx, fields)
        blank = ~(seg_len > 0).any(axis=1)
        seg_len[blank, 0] = 2
        width = int(seg_len.max(initial=2)) if width is None else width
        out = np.full((n, s, width), self.pad_id, dtype=np.int64)
        counts = np.zeros((n, s, width), dtype=np.int64) if self.has_counts else None
        for j, (f, starts, ln) in enumerate(self._segment_spans(idx, fields)):
            present = ln > 0
            out[present, j, 0] = self.cls_id
            src = ragged_positions(starts, starts + ln)
            rows = np.repeat(np.arange(n), ln)
            within = src - np.repeat(starts, ln)
            out[rows, j, 1 + within] = f.tokens[src]
            if counts is not None and f.counts is not None:
                counts[rows, j, 1 + within] = f.counts[src]
            out[np.flatnonzero(present), j, ln[present] + 1] = self.sep_id
        out[blank, 0, 0], out[blank, 0, 1] = self.cls_id, self.sep_id
        mask = np.arange(width)[None, None, :] < seg_len[:, :, None]
        return TokenBatch(out, mask, counts)
