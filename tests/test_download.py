"""Downloads against a local HTTP server (127.0.0.1, started here; no network): success with
a progress bar, checksum mismatch, resume after an interruption, offline errors, and a
named dataset that is fetched into the cache."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from spreading_jax import datasets


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.files: dict[str, bytes] = {}
    self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
    self.cut_next: int | None = None  # the next response stops after this many bytes
    self.ignore_range = False

  def url(self, name: str) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(http.server.BaseHTTPRequestHandler):
  """GET with single-range support (206 + Content-Range), 404 and 416."""

  def log_message(self, *args):
    pass

  def do_GET(self):
    server: _Server = self.server
    rng = self.headers.get("Range")
    server.requests.append((self.path, rng))
    blob = server.files.get(self.path.lstrip("/"))
    if blob is None:
      self.send_error(404)
      return
    start = 0
    if rng and not server.ignore_range:
      start = int(rng.removeprefix("bytes=").split("-")[0])
      if start >= len(blob):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(blob)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
    else:
      self.send_response(200)
    body = blob[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if server.cut_next is not None:
      body, server.cut_next = body[:server.cut_next], None
      self.wfile.write(body)
      self.wfile.flush()
      self.close_connection = True
      self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
      return
    self.wfile.write(body)


@pytest.fixture
def server():
  s = _Server()
  thread = threading.Thread(target=s.serve_forever, daemon=True)
  thread.start()
  yield s
  s.shutdown()
  s.server_close()


def _blob(n=300_000, seed=0) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sha(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def test_download_verifies_and_renames_atomically(server, tmp_path):
  blob = _blob()
  server.files["f.bin"] = blob
  dest = tmp_path / "sub" / "f.bin"
  assert datasets.download(server.url("f.bin"), dest, _sha(blob)) == dest
  assert dest.read_bytes() == blob
  assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]  # no part file left
  assert server.requests == [("/f.bin", None)]


def test_checksum_mismatch_deletes_the_part_and_keeps_no_file(server, tmp_path):
  server.files["f.bin"] = _blob()
  dest = tmp_path / "f.bin"
  with pytest.raises(ValueError, match=r"f.bin is corrupt: sha256 [0-9a-f]{64}, expected 0{64}"):
    datasets.download(server.url("f.bin"), dest, "0" * 64)
  assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
  blob = _blob()
  server.files["f.bin"] = blob
  server.cut_next = 100_000  # the first response drops after 100 kB
  dest = tmp_path / "f.bin"
  datasets.download(server.url("f.bin"), dest, _sha(blob))
  assert dest.read_bytes() == blob
  assert server.requests == [("/f.bin", None), ("/f.bin", "bytes=100000-")]


def test_part_left_by_an_earlier_run_is_resumed(server, tmp_path):
  blob = _blob()
  server.files["f.bin"] = blob
  dest = tmp_path / "f.bin"
  (tmp_path / ".f.bin.part").write_bytes(blob[:123_456])
  datasets.download(server.url("f.bin"), dest, _sha(blob))
  assert dest.read_bytes() == blob
  assert server.requests == [("/f.bin", "bytes=123456-")]
  # A complete part (the previous run died before the rename): 416, then verified.
  dest.unlink()
  (tmp_path / ".f.bin.part").write_bytes(blob)
  datasets.download(server.url("f.bin"), dest, _sha(blob))
  assert dest.read_bytes() == blob and server.requests[-1] == ("/f.bin", f"bytes={len(blob)}-")
  # A server that ignores Range sends the whole file: it is written from the start.
  dest.unlink()
  (tmp_path / ".f.bin.part").write_bytes(b"stale bytes")
  server.ignore_range = True
  datasets.download(server.url("f.bin"), dest, _sha(blob))
  assert dest.read_bytes() == blob


def test_offline_and_missing_fail_in_one_line(server, tmp_path):
  dest = tmp_path / "f.bin"
  with pytest.raises(ValueError) as e:
    datasets.download(server.url("nope.bin"), dest, None)
  assert "cannot download " + server.url("nope.bin") in str(e.value)
  assert f"put it at {dest}" in str(e.value) and "\n" not in str(e.value)
  port = server.server_address[1]
  server.shutdown()
  server.server_close()  # nothing listens on the port any more: as if offline
  with pytest.raises(ValueError, match=rf"cannot download http://127.0.0.1:{port}/f.bin \(.*"
                                       rf"\); download it by hand and put it at {dest}$"):
    datasets.download(f"http://127.0.0.1:{port}/f.bin", dest, None)
  assert not dest.exists()


def _idx_gz(images: np.ndarray) -> bytes:
  header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
  return gzip.compress(header + images.astype(np.uint8).tobytes())


def test_missing_named_dataset_is_downloaded_into_the_cache(mini, server, tmp_path,
                                                            monkeypatch):
  """load_dataset("fashion-mnist") with no data root: fetched, verified, cached, reused."""
  train = _idx_gz(mini.base[:200].reshape(200, 28, 28))
  test = _idx_gz(mini.query[:5].reshape(5, 28, 28))
  server.files.update({"train.gz": train, "t10k.gz": test})
  source = datasets._SOURCES["fashion-mnist"]
  urls = {"fashion-mnist/train-images-idx3-ubyte.gz": (server.url("train.gz"), _sha(train)),
          "fashion-mnist/t10k-images-idx3-ubyte.gz": (server.url("t10k.gz"), _sha(test))}
  monkeypatch.setitem(datasets._SOURCES, "fashion-mnist",
                      datasets.dataclasses.replace(source, urls=urls))
  ds = datasets.load_dataset("fashion-mnist")
  assert (ds.nb, ds.nq, ds.d) == (200, 5, 784)
  np.testing.assert_array_equal(ds.base, mini.base[:200])
  cached = datasets.cache_dir() / "data" / "fashion-mnist"
  assert sorted(p.name for p in cached.iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                      "train-images-idx3-ubyte.gz"]
  n = len(server.requests)
  datasets.load_dataset("fashion-mnist")
  assert len(server.requests) == n  # the second load reads the cache
  # Offline with nothing cached: one line naming the URL and where to put the file.
  for p in cached.iterdir():
    p.unlink()
  server.files.clear()
  with pytest.raises(ValueError) as e:
    datasets.load_dataset("fashion-mnist")
  msg = str(e.value)
  assert msg.startswith("dataset 'fashion-mnist': cannot download " + server.url("train.gz"))
  assert str(cached / "train-images-idx3-ubyte.gz") in msg and "\n" not in msg
