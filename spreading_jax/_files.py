"""Atomic files and directories, and sha256 checksums.

Everything this library saves goes through ``atomic_output`` (one file) or
``atomic_output_dir`` (a directory): a temporary sibling that is fsync'ed and renamed into
place, so a crash never leaves a half-written file. ``sha256_file`` / ``sha256_bytes``
are the one checksum helper that saved indexes, models and downloads share.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
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

def _temp_name(path: Path, suffix: str) -> Path:
  # ``_outputs.temp_name``: a hidden, recognisable name in the target's directory (same
  # filesystem, so the final rename is atomic) with a random part.
  return Path(_outputs.temp_name(path, suffix))


def _make_temp(path: Path, suffix: str, make) -> Path:
  """A new temporary name beside ``path`` made by ``make(name)``, which must fail with
  FileExistsError rather than reuse another writer's file or directory (a name drawn again)."""
  while True:
    tmp = _temp_name(path, suffix)
    try:
      make(tmp)
      return tmp
    except FileExistsError:
      continue


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
    ValueError: ``path`` is an existing directory, a device, FIFO or socket (only regular
      files are replaced), or the block deleted the temporary file.

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
  _outputs.check_regular_or_absent(path)  # never a device, a FIFO or a socket
  path.parent.mkdir(parents=True, exist_ok=True)
  # O_EXCL: never clobber another writer's file; mode 0o666 lets the umask apply.
  tmp = _make_temp(path, ".tmp" + path.suffix, lambda name: os.close(
      os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
  try:
    try:
      yield str(tmp)
    except OSError as e:  # a full disk names the file being written
      if e.filename is not None:
        raise
      raise _named_oserror(e, path) from e
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


def _named_oserror(e: OSError, path: PathLike) -> OSError:
  """``e`` with ``path`` as its file name; numpy's short writes ("40000 requested and
  13280 written", no errno) become ENOSPC when the disk is full."""
  code, text = e.errno, e.strerror or str(e)
  if code is None:
    with contextlib.suppress(OSError):
      if shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free < (1 << 20):
        code, text = errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({text})"
  return OSError(code, text, os.fspath(path))


def preallocate(path: PathLike, start: int = 0, report_as: PathLike | None = None) -> None:
  """Reserves the disk blocks of the file ``path`` from byte ``start`` to its end.

  A memory map written onto a full disk dies of SIGBUS; with its blocks reserved first,
  a full disk is an ``OSError(ENOSPC)`` here, naming ``report_as`` (default ``path``).
  Uses ``posix_fallocate``, or writes zeros where the filesystem has no fallocate.
  """
  name = os.fspath(report_as if report_as is not None else path)
  fd = os.open(path, os.O_RDWR)
  try:
    size = os.fstat(fd).st_size
    try:
      os.posix_fallocate(fd, start, max(size - start, 0))
      return
    except AttributeError:
      pass  # no posix_fallocate (macOS)
    except OSError as e:
      if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        raise OSError(e.errno, f"{e.strerror} (reserving {size} bytes)", name) from e
    zeros = bytes(_HASH_BLOCK)
    os.lseek(fd, start, os.SEEK_SET)
    pos = start
    while pos < size:
      try:
        pos += os.write(fd, zeros[:min(len(zeros), size - pos)])
      except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (reserving {size} bytes)", name) from e
  finally:
    os.close(fd)


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
  # The umask applies, unlike tempfile.mkdtemp's 0o700.
  tmp = _make_temp(path, ".tmp", lambda name: os.mkdir(name, 0o777))
  try:
    try:
      yield str(tmp)
    except OSError as e:  # a full disk names the directory being written
      if e.filename is not None:
        raise
      raise _named_oserror(e, path) from e
    _fsync_tree(tmp)
    _outputs.check_replace(path, tmp)  # a model is replaced by a model, an index by an index
    if path.exists():
      old = _temp_name(path, ".old")
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


# ---------------------------------------------------------------------------------------
# Consistent reads of a saved directory.

def check_format_version(path: str, what: str, have, want: int) -> None:
  """ValueError unless the metadata's format_version ``have`` is the integer ``want``."""
  if type(have) is not int or have != want:  # pylint: disable=unidiomatic-typecheck
    kind = "" if type(have) is int else f" (a {type(have).__name__}, not an integer)"
    raise ValueError(f"{path} has {what} format version {have!r}{kind}; this library reads "
                     f"version {want}")


class ChangedWhileReading(ValueError):
  """A saved directory was replaced (by a concurrent save) while it was being read."""


def check_saved_dir(path: PathLike, meta_name: str, missing: str) -> None:
  """Raises unless ``path``/``meta_name`` is a file: ``ChangedWhileReading`` while a save
  swaps a new copy in (``path`` is briefly absent and its old copy lies beside it as
  ``.NAME.<random>.old``), else ValueError(``missing``)."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, meta_name)):
    return
  parent, name = os.path.split(os.path.abspath(path))
  pattern = re.compile(r"\." + re.escape(name) + r"\.[0-9a-f]{8}\.old")
  with contextlib.suppress(OSError):
    aside = [e for e in os.listdir(parent) if pattern.fullmatch(e)]
    if aside:
      raise ChangedWhileReading(f"{path} is being replaced by a save (or a save was "
                                f"interrupted, leaving its old copy {aside[0]}); load again")
  raise ValueError(missing)


# Reads relative to an open directory descriptor where the OS supports it (Linux, macOS).
_DIR_FD = (os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd
           and hasattr(os, "O_DIRECTORY"))


class SavedDir:
  """Reads the files of one saved directory, each once, all from the same save.

  Saves never change a directory in place: ``atomic_output_dir`` writes a new one and
  renames it over ``path``. The directory is opened once and every file is opened relative
  to that open directory, so all of them come from the copy that ``path`` named when the
  read began, even when a concurrent save renames a new copy in meanwhile. If that save
  deletes the old copy before a file of it is opened, ``read`` raises
  ``ChangedWhileReading`` (one line: load again) instead of reading the new copy's file.
  Where the OS has no ``dir_fd`` the files are read by path; the checksums in the
  metadata file (read first) then catch a file of another save.

  Args:
    path: the saved directory.
    what: "index" or "model", for messages.

  Raises:
    ValueError: ``path`` is not a directory.
  """

  def __init__(self, path: PathLike, what: str):
    self.path, self.what = os.fspath(path), what
    self._fd = None
    if not os.path.isdir(self.path):
      raise ValueError(f"{self.path} is not a saved {what} (not a directory)")
    if _DIR_FD:
      try:
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
      except OSError as e:
        raise ValueError(f"{self.path}: cannot open the saved {what} ({e.strerror})") from e

  def __enter__(self) -> "SavedDir":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def full(self, rel: str) -> str:
    """The path of ``rel`` (a "/"-separated name inside the directory), for messages."""
    return os.path.join(self.path, *rel.split("/"))

  def replaced(self) -> bool:
    """True when ``path`` no longer names the directory this reader opened."""
    if self._fd is None:
      return False
    try:
      now = os.stat(self.path)
    except OSError:
      return True
    mine = os.fstat(self._fd)
    return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

  def changed(self) -> ChangedWhileReading:
    return ChangedWhileReading(f"{self.path} changed while it was being read (another "
                               f"process saved over it); load the {self.what} again")

  def _open(self, rel: str) -> int:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if self._fd is not None:
      return os.open(rel, flags, dir_fd=self._fd)
    return os.open(self.full(rel), flags)

  def is_file(self, rel: str) -> bool:
    """True when ``rel`` is a regular file (not through a symbolic link)."""
    try:
      if self._fd is not None:
        st = os.stat(rel, dir_fd=self._fd, follow_symlinks=False)
      else:
        st = os.lstat(self.full(rel))
    except OSError:
      return False
    return stat.S_ISREG(st.st_mode)

  def files_under(self, rel: str) -> list[str]:
    """The "/"-separated names of every file under the subdirectory ``rel`` (sorted)."""
    out = []
    if self._fd is not None:
      try:
        sub = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0),
                      dir_fd=self._fd)
      except OSError:
        return []
      try:
        for dirpath, _, names, _ in os.fwalk(".", dir_fd=sub):
          out += [os.path.normpath(os.path.join(rel, dirpath, n)).replace(os.sep, "/")
                  for n in names]
      finally:
        os.close(sub)
    else:
      for dirpath, _, names in os.walk(self.full(rel)):
        out += [os.path.relpath(os.path.join(dirpath, n), self.path).replace(os.sep, "/")
                for n in names]
    return sorted(out)

  def read(self, rel: str, size: int | None = None, max_size: int | None = None,
           why: str = "", sha256: str | None = None) -> bytearray:
    """The whole content of the file ``rel``, read once.

    Its size is checked before anything is allocated: ``size`` exactly, or at most
    ``max_size`` bytes (``why`` says where the bound comes from, for the message). With
    ``sha256`` the bytes read (the ones the caller deserializes) must have that digest.

    Raises:
      ChangedWhileReading: the file vanished because a concurrent save replaced the
        directory.
      ValueError: the file is missing, not a regular file, or of the wrong size.
    """
    full = self.full(rel)
    try:
      fd = self._open(rel)
    except FileNotFoundError as e:
      if self.replaced():
        raise self.changed() from e
      raise ValueError(f"{full} is missing from the saved {self.what}") from e
    except OSError as e:
      raise ValueError(f"{full} cannot be read as a regular file of the saved {self.what} "
                       f"({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
      st = os.fstat(f.fileno())
      if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{full} is not a regular file")
      if size is not None and st.st_size != size:
        raise ValueError(f"{full} is truncated or corrupt: it has {st.st_size} bytes but "
                         f"{size} were expected{why}")
      if max_size is not None and st.st_size > max_size:
        raise ValueError(f"{full} is corrupt: it has {st.st_size} bytes, more than the "
                         f"{max_size} possible{why}")
      buf = bytearray(st.st_size)
      got = f.readinto(buf)
      if got != st.st_size or f.read(1):
        if self.replaced():
          raise self.changed()
        raise ValueError(f"{full} changed size while it was being read")
    if sha256 is not None and sha256_bytes(buf) != sha256:
      if self.replaced():
        raise self.changed()
      raise ValueError(f"{full} is truncated or corrupt (checksum mismatch)")
    return buf
