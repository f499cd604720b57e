"""Atomic files and directories, and sha256 checksums.

Everything this library saves goes through ``atomic_output`` (one file) or
``atomic_output_dir`` (a directory): a temporary sibling that is fsync'ed and renamed into
place, so a crash never leaves a half-written file. ``sha256_file`` / ``sha256_bytes``
are the one checksum helper that saved indexes, models and downloads share.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterable, Iterator

from spreading_jax import _outputs

PathLike = str | os.PathLike

# Bytes read at a time when hashing a file.
_HASH_BLOCK = 1 << 20

# ---------------------------------------------------------------------------------------
# Atomic writes.

def _temp_name(parent: Path, name: str, suffix: str) -> Path:
  # A hidden, recognisable name in the target's directory (same filesystem, so the final
  # rename is atomic); the random part avoids collisions between concurrent writers.
  return parent / f".{name}.{secrets.token_hex(4)}{suffix}"


def fsync_path(path: PathLike) -> None:
  """Flushes a file or directory to disk (best effort where the OS refuses directories)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return  # e.g. directories on Windows
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems do not support fsync on directories
  finally:
    os.close(fd)


def _fsync_tree(root: PathLike) -> None:
  for dirpath, _, filenames in os.walk(root):
    for filename in filenames:
      full = os.path.join(dirpath, filename)
      if os.path.isfile(full) and not os.path.islink(full):
        fsync_path(full)
    fsync_path(dirpath)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
  """Writes a file atomically: yields a temporary path that replaces ``path`` on success.

  The temporary file is created (empty) in the same directory as ``path`` and keeps its
  suffix (so ``np.save``/``np.savez`` do not append another one). When the block exits
  normally the file is fsync'ed and ``os.replace``d onto ``path``, so readers see either
  the old or the new complete file, never a partial one. When the block raises, the
  temporary file is removed and ``path`` is untouched. The new file gets the permissions
  of the file it replaces, else the usual ones (0o666 minus the umask). Missing parent
  directories are created. For a directory use ``atomic_output_dir``.

  Args:
    path: the file to (re)write.

  Yields:
    The temporary file path (a ``str``) to write to; the block may also replace it
    (e.g. ``h5py.File(tmp, "w")``).

  Raises:
    ValueError: ``path`` is an existing directory, or the block deleted the temporary file.

  Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "hello.txt"
    >>> with atomic_output(target) as tmp:
    ...   _ = Path(tmp).write_text("hello")
    >>> target.read_text()
    'hello'
  """
  path = Path(path)
  if path.is_dir():
    raise ValueError(f"{path}: is a directory; use atomic_output_dir to replace a directory")
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    tmp = _temp_name(path.parent, path.name, ".tmp" + path.suffix)
    try:
      # O_EXCL: never clobber another writer's file; mode 0o666 lets the umask apply.
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      break
    except FileExistsError:
      continue
  try:
    yield str(tmp)
    if not tmp.is_file():
      raise ValueError(f"{path}: the temporary file {tmp} was removed inside the "
                       "atomic_output block; nothing was written")
    with contextlib.suppress(FileNotFoundError):
      os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    fsync_path(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  fsync_path(path.parent)


@contextlib.contextmanager
def atomic_output_dir(path: PathLike) -> Iterator[str]:
  """Writes a directory atomically: yields a temporary directory that becomes ``path``.

  The temporary directory is created next to ``path``. When the block exits normally its
  whole tree is fsync'ed; then an existing ``path`` is renamed aside, the new directory
  is renamed into place and only then is the old one deleted. If the second rename fails
  the old directory is put back. A crash between the two renames (a window of two
  ``rename`` calls) leaves the complete old copy as ``.{name}.<random>.old`` beside
  ``path``. When the block raises, the temporary directory is deleted and ``path`` is
  untouched.

  Only what this library wrote is ever replaced (``_outputs.check_output_dir``): ``path``
  must be absent, empty, or a saved model or index directory, and a saved directory is
  replaced only by one of the same kind; anything else raises before the block runs.

  Args:
    path: the directory to (re)write.

  Yields:
    The temporary directory path (a ``str``), initially empty.

  Raises:
    ValueError: ``path`` exists and is not a directory, is a non-empty directory this
      library did not write, the current directory, or a saved directory of another kind
      than the one written.

  Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "ckpt"
    >>> with atomic_output_dir(target) as tmp:
    ...   _ = (Path(tmp) / "params.npy").write_bytes(b"...")
    >>> sorted(p.name for p in target.iterdir())
    ['params.npy']
  """
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path}: exists and is not a directory; atomic_output_dir replaces "
                     "directories only")
  _outputs.check_output_dir(path)  # only an absent/empty dir or a saved model/index
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    tmp = _temp_name(path.parent, path.name, ".tmp")
    try:
      os.mkdir(tmp, 0o777)  # the umask applies, unlike tempfile.mkdtemp's 0o700
      break
    except FileExistsError:
      continue
  try:
    yield str(tmp)
    _fsync_tree(tmp)
    _outputs.check_replace(path, tmp)  # a model is replaced by a model, an index by an index
    if path.exists():
      old = _temp_name(path.parent, path.name, ".old")
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      fsync_path(path.parent)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  fsync_path(path.parent)


# ---------------------------------------------------------------------------------------
# Checksums.

def sha256_bytes(blob: bytes) -> str:
  """The hex sha256 digest of ``blob``."""
  return hashlib.sha256(blob).hexdigest()


def sha256_file(path: PathLike, h=None) -> str:
  """The hex sha256 digest of a file's content, read in 1 MiB blocks (bounded memory).

  Args:
    path: the file.
    h: optional running ``hashlib.sha256()`` object to update (e.g. to resume a digest
      over a partly downloaded file); its digest after the file is returned.

  Example:
    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = f.write_bytes(b"abc")
    >>> sha256_file(f)[:16]
    'ba7816bf8f01cfea'
  """
  h = hashlib.sha256() if h is None else h
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_HASH_BLOCK), b""):
      h.update(block)
  return h.hexdigest()


def sha256_files(paths: Iterable[PathLike]) -> str:
  """One hex sha256 digest over several files' names and contents (a content key).

  Only the base names enter the digest, so a moved or copied set of files keeps its key.
  """
  h = hashlib.sha256()
  for p in paths:
    h.update(Path(p).name.encode() + b"\0")
    sha256_file(p, h)
  return h.hexdigest()
