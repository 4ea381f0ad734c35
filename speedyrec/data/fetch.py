"""Download MIND: ``python -m speedyrec.data.fetch mind-small|mind-large|mind-demo DIR [--mirror URL]``.

MIND's download links move and break often. This fetcher resumes partial downloads (HTTP Range), retries with
backoff, shows a progress bar, checks each archive (size against the server's, every member's CRC, and a
SHA-256 when one is given), and extracts each archive into ``DIR/<archive name>/`` (``MINDsmall_train/``,
``MINDsmall_dev/``, ...), the layout ``data.dir=DIR`` reads. Nothing here runs unless you call it.

URLs: ``--mirror BASE`` (or ``$SPEEDYREC_MIND_MIRROR``) replaces the base URL of every archive; ``--url
NAME=URL`` replaces one (NAME as ``MINDsmall_train``); ``--sha256 NAME=HEX`` checks one. MIND is distributed by
Microsoft under the Microsoft Research License Terms: read them before you download.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

BASES = {"mind": "https://mind201910small.blob.core.windows.net/release",
         "demo": "https://recodatasets.z20.web.core.windows.net/newsrec"}
DATASETS = {
    "mind-small": ("mind", ["MINDsmall_train", "MINDsmall_dev"]),
    "mind-large": ("mind", ["MINDlarge_train", "MINDlarge_dev", "MINDlarge_test"]),
    "mind-demo": ("demo", ["MINDdemo_train", "MINDdemo_dev"]),
}
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or an archive failed; the message names the URL or file and what to do."""


def download(url: str, dest: Path, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
             quiet: bool = False) -> Path:
    """Download ``url`` to ``dest``, continuing ``dest.part`` from where an earlier try stopped."""
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if have and resp.status != 206:  # the server ignored the range: start again
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                _copy(resp, part, have, total, dest.name, quiet)
            if total is not None and part.stat().st_size != total:
                raise FetchError(f"{url}: got {part.stat().st_size} of {total} bytes")
            part.replace(dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the range starts at the end: the part is complete
                part.replace(dest)
                return dest
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}. The link may have moved: pass --mirror BASE_URL "
                                 f"or --url {dest.stem}=URL") from e
            last = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, FetchError) as e:
            last = e
        if not quiet:
            print(f"{dest.name}: try {attempt + 1} failed ({last}); "
                  f"{'retrying' if attempt < retries else 'giving up'}", file=sys.stderr)
    raise FetchError(f"{url}: failed after {retries + 1} tries ({last}); the partial download {part} is kept "
                     "and a later run continues it")


def _copy(resp, part: Path, have: int, total: int | None, name: str, quiet: bool) -> None:
    from speedyrec.engine.runlog import progress

    bar = progress(total, name, "B", enabled=not quiet)
    bar.update(have)
    with open(part, "ab" if have else "wb") as f:
        while True:
            block = resp.read(CHUNK)
            if not block:
                break
            f.write(block)
            bar.update(len(block))
    bar.close()


def check_archive(path: Path, sha256: str | None = None) -> None:
    """Every member's CRC (and the whole file's SHA-256 when given); a bad archive is renamed *.corrupt."""
    try:
        if sha256:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    h.update(block)
            if h.hexdigest() != sha256.lower():
                raise FetchError(f"{path}: SHA-256 {h.hexdigest()} is not the expected {sha256}")
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                raise FetchError(f"{path}: member {bad} fails its CRC check")
    except (zipfile.BadZipFile, FetchError) as e:
        bad_path = path.with_name(path.name + ".corrupt")
        path.replace(bad_path)
        raise FetchError(f"{e if isinstance(e, FetchError) else f'{path}: not a valid zip archive ({e})'}; moved to "
                         f"{bad_path}: run the fetch again to download it anew") from e


def extract(archive: Path, target: Path) -> None:
    """Extract into ``target`` atomically: a temporary folder renamed once complete."""
    tmp = target.with_name(target.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        for m in z.namelist():
            if m.startswith("/") or ".." in Path(m).parts:
                raise FetchError(f"{archive}: unsafe member path {m}")
        z.extractall(tmp)
    # archives that wrap their files in one folder of the same name are flattened
    inner = [p for p in tmp.iterdir()]
    if len(inner) == 1 and inner[0].is_dir() and not (tmp / "behaviors.tsv").exists():
        tmp2 = target.with_name(target.name + ".flat")
        inner[0].replace(tmp2)
        tmp.rmdir()
        tmp = tmp2
    tmp.replace(target)


def fetch(dataset: str, out: Path, mirror: str | None = None, urls: dict[str, str] | None = None,
          sha256: dict[str, str] | None = None, keep_archives: bool = False, quiet: bool = False, **kw) -> list[Path]:
    if dataset not in DATASETS:
        raise FetchError(f"unknown data set {dataset!r}: one of {', '.join(DATASETS)}")
    base_key, names = DATASETS[dataset]
    base = (mirror or os.environ.get("SPEEDYREC_MIND_MIRROR") or BASES[base_key]).rstrip("/")
    urls, sha256 = urls or {}, sha256 or {}
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names:
        target = out / name
        if (target / "behaviors.tsv").is_file() and (target / "news.tsv").is_file():
            if not quiet:
                print(f"{target}: already there", file=sys.stderr)
            done.append(target)
            continue
        archive = out / f"{name}.zip"
        if not archive.exists():
            download(urls.get(name, f"{base}/{name}.zip"), archive, quiet=quiet, **kw)
        check_archive(archive, sha256.get(name))
        extract(archive, target)
        for needed in ("behaviors.tsv", "news.tsv"):
            if not (target / needed).is_file():
                raise FetchError(f"{archive} has no {needed}: is it a MIND archive?")
        if not keep_archives:
            archive.unlink()
        done.append(target)
    return done


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="speedyrec.data.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("dir", help="where to put it (then data.dir=DIR, data.format=mind)")
    ap.add_argument("--mirror", default="", help="base URL replacing the official one for every archive")
    ap.add_argument("--url", action="append", default=[], help="NAME=URL for one archive (NAME as MINDsmall_train)")
    ap.add_argument("--sha256", action="append", default=[], help="NAME=HEX: check an archive's SHA-256")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--keep-archives", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        dirs = fetch(a.dataset, Path(a.dir), a.mirror or None, _pairs(a.url, "--url"), _pairs(a.sha256, "--sha256"),
                     keep_archives=a.keep_archives, quiet=a.quiet, retries=a.retries)
    except FetchError as e:
        print(f"speedyrec.data.fetch: {e}", file=sys.stderr)
        return 1
    print(f"{a.dataset} in {a.dir}: {', '.join(d.name for d in dirs)}; train with data.format=mind data.dir={a.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
