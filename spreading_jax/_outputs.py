"""Output checks: every writer refuses to destroy what is not its own, before any work.

A saved model or index directory may be replaced by a newer one of the same kind (that is
how ``--out`` overwrites); anything else that exists is left alone: a directory holding
other files, a model where an index is asked for, an input of the same command, the
current directory. ``atomic_output_dir`` calls ``check_output_dir`` before it creates
anything and ``check_replace`` before it swaps the new directory in; the CLI calls the same
checks with the command's inputs before any training or encoding starts.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat

PathLike = str | os.PathLike

# Directory kinds this library writes: kind -> (metadata file, its "kind" value). The one
# place these names are spelled: model.py and index.py write and read them from here.
KINDS = {
    "model": ("model.json", "spreading_jax.catalyzer"),
    "index": ("index.json", "spreading_jax.index"),
}


def dir_kind(path: PathLike) -> str | None:
  """The kind of the saved directory ``path``: "model", "index", or None when it is absent
  or empty.

  Raises:
    ValueError: ``path`` exists and is not a directory this library wrote.
  """
  path = os.fspath(path)
  if not os.path.lexists(path):
    return None
  if not os.path.isdir(path):
    raise ValueError(f"{path} exists and is not a directory")
  if not os.listdir(path):
    return None
  for kind, (meta_name, tag) in KINDS.items():
    meta = os.path.join(path, meta_name)
    if not os.path.isfile(meta):
      continue
    with contextlib.suppress(OSError, ValueError, RecursionError):
      with open(meta, encoding="utf-8") as f:
        if (json.load(f) or {}).get("kind") == tag:
          return kind
  raise ValueError(f"{path} is a non-empty directory that is not a saved spreading_jax model "
                   "or index; refusing to replace it (choose a new or empty directory)")


def _a(kind: str) -> str:
  return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _real(path: PathLike) -> str:
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _contains(outer: str, inner: str) -> bool:
  """True when the resolved path ``inner`` is ``outer`` or lies inside it."""
  return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def same_path(a: PathLike, b: PathLike) -> bool:
  """True when a and b name the same file or directory (through links too; by resolved
  path where either does not exist yet)."""
  with contextlib.suppress(OSError):
    return os.path.samefile(a, b)
  return _real(a) == _real(b)


def temp_name(path: PathLike, suffix: str) -> str:
  """A hidden name ``.NAME.<random>SUFFIX`` beside ``path`` (same filesystem, so it can be
  renamed onto ``path`` atomically; the random part keeps concurrent writers apart)."""
  path = os.path.abspath(os.fspath(path))
  return os.path.join(os.path.dirname(path),
                      f".{os.path.basename(path)}.{secrets.token_hex(4)}{suffix}")


def check_parent_writable(path: PathLike) -> None:
  """Raises ValueError unless ``path`` can be created: its nearest existing ancestor is a
  writable directory (probed by creating and removing a hidden file, which also works
  for root, read-only mounts and ACLs)."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{path}: {parent} is a file, not a directory")
  probe = os.path.join(parent, f".spreading_jax.{secrets.token_hex(4)}.probe")
  try:
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
  except OSError as e:
    raise ValueError(f"{path}: cannot write in {parent} ({e.strerror})") from e
  os.unlink(probe)


def _check_inputs_apart(path: PathLike, inputs) -> None:
  out = _real(path)
  for given in inputs:
    if given is None or not os.path.lexists(os.fspath(given)):
      continue
    src = _real(given)
    if same_path(path, given) if os.path.lexists(os.fspath(path)) else out == src:
      raise ValueError(f"output {os.fspath(path)} is the input {os.fspath(given)}; choose "
                       "another output")
    if _contains(out, src):
      raise ValueError(f"input {os.fspath(given)} lies inside the output directory "
                       f"{os.fspath(path)}, which would be replaced; choose another output")
    if os.path.isdir(src) and _contains(src, out):
      raise ValueError(f"output {os.fspath(path)} lies inside the input {os.fspath(given)}; "
                       "choose another output")


def _check_not_inside_saved(path: PathLike) -> None:
  """A new directory inside a saved model or index would vanish when that one is replaced
  (and would break its checksums): refuse it."""
  parent = os.path.dirname(_real(path))
  while True:
    for kind, (meta, _) in KINDS.items():
      if os.path.isfile(os.path.join(parent, meta)):
        have = None
        with contextlib.suppress(ValueError):
          have = dir_kind(parent)
        if have == kind:
          raise ValueError(f"{os.fspath(path)} lies inside the saved {kind} {parent}; "
                           "choose a path outside it")
    up = os.path.dirname(parent)
    if up == parent:
      return
    parent = up


def check_output_dir(path: PathLike, kind: str | None = None, inputs=()) -> str | None:
  """Checks that directory ``path`` may be (re)written; returns the kind it holds now.

  Args:
    path: the directory to write.
    kind: "model" or "index": an existing saved directory must be of this kind. None
      accepts either (``atomic_output_dir``, which checks the kind it writes later).
    inputs: paths the command reads; the output may be none of them, contain none of
      them, and lie inside none of them.

  Raises:
    ValueError: ``path`` is a file, a foreign or non-empty directory, a saved directory
      of another kind, the current directory, an input, or cannot be created.
  """
  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind={kind!r} must be one of {sorted(KINDS)}")
  name = os.fspath(path)
  if not name:
    raise ValueError("the output directory name is empty")
  if _contains(_real(path), _real(os.getcwd())):
    raise ValueError(f"output directory {name} is (or contains) the current directory; "
                     "refusing to replace it")
  _check_inputs_apart(path, inputs)
  _check_not_inside_saved(path)
  have = dir_kind(path)
  if kind is not None and have is not None and have != kind:
    raise ValueError(f"{name} is a saved {have}, not {_a(kind)}; refusing to replace it "
                     f"with {_a(kind)}")
  check_parent_writable(path)
  return have


def check_replace(path: PathLike, new_dir: PathLike) -> None:
  """Before ``new_dir`` replaces ``path``: both must be saved directories of one kind."""
  have = dir_kind(path)
  if have is None:
    return
  new = dir_kind(new_dir)
  if new != have:
    raise ValueError(f"{os.fspath(path)} is a saved {have}; refusing to replace it with "
                     f"{_a(new) if new else 'a directory of another kind'}")


def check_regular_or_absent(path: PathLike) -> None:
  """Raises ValueError unless ``path`` is absent or a regular file (also through a
  symbolic link): a character device (/dev/null), a FIFO, a socket or a block device is
  never replaced by a file."""
  name = os.fspath(path)
  try:
    st = os.stat(name)
  except (FileNotFoundError, NotADirectoryError):
    return  # absent, or a dangling symbolic link (replaced by the file)
  if stat.S_ISDIR(st.st_mode):
    raise ValueError(f"output {name} is a directory, a file was expected")
  if not stat.S_ISREG(st.st_mode):
    what = ("a character device" if stat.S_ISCHR(st.st_mode) else
            "a FIFO" if stat.S_ISFIFO(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else
            "a block device" if stat.S_ISBLK(st.st_mode) else "not a regular file")
    raise ValueError(f"output {name} is {what}; only a regular file or a new path is "
                     "written")


def check_output_file(path: PathLike, inputs=()) -> None:
  """Checks that the file ``path`` may be (re)written, before any work starts.

  Raises:
    ValueError: ``path`` is a directory, a device, FIFO or socket, one of ``inputs`` (also
      through a symlink, a hard link or a relative path), lies inside a saved model or
      index, or its directory cannot be created or written.
  """
  name = os.fspath(path)
  if not name or name.endswith(os.sep):
    raise ValueError(f"output file name {name!r} is empty or ends with {os.sep!r}")
  check_regular_or_absent(name)
  _check_inputs_apart(path, inputs)
  _check_not_inside_saved(path)
  check_parent_writable(path)


def check_apart(a: PathLike, a_name: str, b: PathLike, b_name: str) -> None:
  """Raises ValueError when the outputs ``a`` and ``b`` are one path or one lies inside
  the other, whether or not they exist yet (e.g. --checkpoint-dir and --out)."""
  ra, rb = _real(a), _real(b)
  if ra == rb or _contains(ra, rb) or _contains(rb, ra):
    raise ValueError(f"{a_name} {os.fspath(a)} and {b_name} {os.fspath(b)} are the same "
                     "directory or one lies inside the other; choose separate directories")


def check_checkpoint_dir(path: PathLike, inputs=()) -> None:
  """Checks a training checkpoint directory before training: absent, empty, or one that
  holds a run's ``config.json`` (whose key the trainer then compares), never a file, a
  saved model or index, an input, or a directory of other files it would write into.
  """
  name = os.fspath(path)
  if os.path.lexists(name) and not os.path.isdir(name):
    raise ValueError(f"checkpoint directory {name} exists and is not a directory")
  _check_inputs_apart(path, inputs)
  if os.path.isdir(name) and os.listdir(name):
    if any(os.path.isfile(os.path.join(name, meta)) for meta, _ in KINDS.values()):
      raise ValueError(f"checkpoint directory {name} is a saved model or index")
    if not os.path.isfile(os.path.join(name, "config.json")):
      raise ValueError(f"checkpoint directory {name} holds other files and no checkpoint "
                       "(config.json); choose a new or empty directory")
  check_parent_writable(os.path.join(name, "probe"))
