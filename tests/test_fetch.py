"""The MIND fetcher against a local HTTP server: download, resume after a cut connection, integrity checks,
extraction into the layout data.dir reads, and clear errors."""
from __future__ import annotations

import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from speedyrec.data.fetch import FetchError, fetch, main

NEWS = "N1\tsports\tfootball\tA title\tAn abstract\thttp://x\t[]\t[]\n"
BEHAVIORS = "1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1\n"


def mind_zip(folder: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{folder}news.tsv", NEWS * 2000)  # big enough to be cut mid-way
        z.writestr(f"{folder}behaviors.tsv", BEHAVIORS)
    return buf.getvalue()


class Server:
    """Serves ``files`` with Range support; ``cut[name] = n`` ends the first response for name after n bytes."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.requests = files, {}, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                owner.requests.append((name, self.headers.get("Range")))
                if name not in owner.files:
                    self.send_error(404)
                    return
                data, start = owner.files[name], 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if name in owner.cut:
                    body = body[:owner.cut.pop(name)]  # the connection drops mid-way, once
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/release"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = Server({"MINDdemo_train.zip": mind_zip(), "MINDdemo_dev.zip": mind_zip("MINDdemo_dev/")})
    yield s
    s.close()


def test_fetch_resumes_a_cut_download_and_extracts_the_layout(tmp_path, server):
    full = server.files["MINDdemo_train.zip"]
    server.cut["MINDdemo_train.zip"] = len(full) // 3
    dirs = fetch("mind-demo", tmp_path, mirror=server.url, quiet=True, backoff=0.0)
    assert [d.name for d in dirs] == ["MINDdemo_train", "MINDdemo_dev"]
    for d in dirs:  # a wrapping folder inside the archive is flattened
        assert (d / "news.tsv").read_text() == NEWS * 2000 and (d / "behaviors.tsv").read_text() == BEHAVIORS
    train = [r for r in server.requests if r[0] == "MINDdemo_train.zip"]
    assert train == [("MINDdemo_train.zip", None), ("MINDdemo_train.zip", f"bytes={len(full) // 3}-")]  # resumed
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob("*.part"))
    # the data layer reads what was fetched
    from speedyrec.config import load_config
    from speedyrec.data.dataset import load_dataset

    data = load_dataset(load_config(None, ["data.format=mind", f"data.dir={tmp_path}"]).data)
    assert len(data.news) == 1 and len(data.train) == 1 and len(data.dev) == 1
    # a second fetch finds everything in place and downloads nothing
    n = len(server.requests)
    fetch("mind-demo", tmp_path, mirror=server.url, quiet=True)
    assert len(server.requests) == n


def test_a_corrupt_archive_is_moved_aside_with_a_clear_error(tmp_path, server):
    bad = bytearray(server.files["MINDdemo_train.zip"])
    bad[len(bad) // 2] ^= 0xFF
    server.files["MINDdemo_train.zip"] = bytes(bad)
    with pytest.raises(FetchError, match="CRC|not a valid zip"):
        fetch("mind-demo", tmp_path, mirror=server.url, quiet=True)
    assert (tmp_path / "MINDdemo_train.zip.corrupt").exists() and not (tmp_path / "MINDdemo_train").exists()


def test_a_wrong_checksum_and_a_missing_file_say_what_to_do(tmp_path, server, capsys):
    with pytest.raises(FetchError, match="SHA-256"):
        fetch("mind-demo", tmp_path, mirror=server.url, quiet=True, sha256={"MINDdemo_train": "00" * 32})
    rc = main(["mind-small", str(tmp_path / "s"), "--mirror", server.url, "--quiet", "--retries", "0"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "--mirror" in err and "MINDsmall_train.zip" in err
