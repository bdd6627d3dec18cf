"""Readers that turn text shipped inside installed packages (or a user's files) into documents.

Every reader yields *units* `(key, documents)`: a unit is the granularity of the train/validation split
(a Wikipedia article, a source file, a conversation, a group of fortunes, a user document), so no
document, nor any piece of the same article/file/conversation, is in both splits. `key` is unique and
stable across runs; the split is decided from a hash of it.

Nothing here downloads anything: a missing pip package raises `MissingPackageError` naming
`pip install -e ".[corpora]"`, missing Debian packages raise `MissingDebianPackagesError` naming the
`apt-get install` command.
"""

from __future__ import annotations

import bz2
import importlib
import json
import os
import platform
import re
import sysconfig
from typing import Any, Iterable, Iterator, Sequence

Unit = tuple[str, list[str]]

CORPORA_INSTALL = 'pip install -e ".[corpora]"'
WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FORTUNES_ROOT = "/usr/share/games/fortunes"
# Debian package -> paths (relative to FORTUNES_ROOT) it installs.
FORTUNE_PACKAGES = {
  "fortunes-de": ("de",),
  "fortunes-ru": ("ru",),
  "fortunes-zh": ("chinese", "song100", "tang300"),
}
# Directory names under the stdlib that hold test suites or third-party code.
_CODE_EXCLUDED_DIRS = frozenset(
  {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "test_support"}
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


class MissingPackageError(ImportError):
  """A pip package that a default corpus is built from is not installed."""


class MissingDebianPackagesError(FileNotFoundError):
  """The files of an optional Debian-packaged corpus are not on this machine."""

  def __init__(self, packages: Sequence[str]):
    self.packages = tuple(packages)
    self.command = "apt-get install -y " + " ".join(self.packages)
    super().__init__(
      f"Debian packages {', '.join(self.packages)} are not installed; "
      f"install them with: {self.command}"
    )


def require_module(module: str, purpose: str):
  """Imports `module` or raises MissingPackageError naming the install command."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingPackageError(
      f"The '{module}' package is needed for {purpose} but is not installed. "
      f"Install the corpora extra: {CORPORA_INSTALL}"
    ) from e


def group_paragraphs(text: str, max_chars: int) -> list[str]:
  """Splits `text` at blank lines and regroups consecutive paragraphs into chunks of <= max_chars.

  Leading indentation is kept (code), trailing whitespace dropped; a single paragraph longer than
  `max_chars` stays whole. Returns non-empty chunks joined by one blank line.
  """
  paragraphs = [p.strip("\n").rstrip() for p in _PARAGRAPH_BREAK.split(text)]
  paragraphs = [p for p in paragraphs if p.strip()]
  chunks: list[str] = []
  current: list[str] = []
  size = 0
  for p in paragraphs:
    if current and size + 2 + len(p) > max_chars:
      chunks.append("\n\n".join(current))
      current, size = [], 0
    current.append(p)
    size += len(p) + (2 if size else 0)
  if current:
    chunks.append("\n\n".join(current))
  return chunks


# ----------------------------------------------------------------------------------------- wiki_en
def _wiki_sample_path() -> str:
  gensim = require_module("gensim", "the wiki_en corpus (gensim's enwiki test sample)")
  path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", WIKI_SAMPLE)
  if not os.path.exists(path):
    raise MissingPackageError(
      f"gensim is installed but its test data {path} is missing; reinstall it: {CORPORA_INSTALL}"
    )
  return path


_WIKI_QUOTES = re.compile(r"'{2,}")
_WIKI_HEADING = re.compile(r"^[ \t]*=+[ \t]*(.*?)[ \t]*=+[ \t]*$", re.MULTILINE)
_WIKI_FILE_LINE = re.compile(r"^[ \t]*(File|Image):.*$", re.MULTILINE | re.IGNORECASE)
_WIKI_EMPTY_BULLET = re.compile(r"^[*#:; \t]+$", re.MULTILINE)


def clean_wiki_text(filtered: str) -> str:
  """Post-processing after gensim's `filter_wiki`: drops bold/italic quotes, gallery file lines and
  empty list bullets, turns `== Heading ==` into `Heading`, collapses blank-line runs."""
  text = _WIKI_QUOTES.sub("", filtered)
  text = _WIKI_FILE_LINE.sub("", text)
  text = _WIKI_HEADING.sub(r"\1", text)
  text = _WIKI_EMPTY_BULLET.sub("", text)
  text = re.sub(r"[ \t]+\n", "\n", text)
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def wiki_en_units(max_chars: int = 2000) -> Iterator[Unit]:
  """Non-redirect main-namespace articles of gensim's enwiki sample; one unit per article, whose
  documents are the title plus paragraphs regrouped into chunks of <= max_chars characters."""
  require_module("gensim", "the wiki_en corpus")
  from gensim.corpora import wikicorpus  # pylint: disable=import-outside-toplevel

  with bz2.BZ2File(_wiki_sample_path()) as f:
    for title, text, _ in wikicorpus.extract_pages(f, filter_namespaces=("0",)):
      if text.lstrip().lower().startswith("#redirect"):
        continue
      clean = clean_wiki_text(wikicorpus.filter_wiki(text))
      if len(clean.split()) < wikicorpus.ARTICLE_MIN_WORDS:
        continue
      yield title, group_paragraphs(f"{title}\n\n{clean}", max_chars)


def wiki_en_fingerprint() -> dict[str, Any]:
  gensim = require_module("gensim", "the wiki_en corpus")
  return {
    "gensim": gensim.__version__,
    "file": WIKI_SAMPLE,
    "bytes": os.path.getsize(_wiki_sample_path()),
  }


# ----------------------------------------------------------------------------------------- code_py
def stdlib_files(max_file_bytes: int) -> list[tuple[str, str]]:
  """(relative path, absolute path) of the running interpreter's stdlib .py files, sorted, without
  test suites (`test/`, `tests/`, `idle_test/`, `test_*.py`), site-packages, and files larger than
  `max_file_bytes` (generated tables such as pydoc_data/topics.py)."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _CODE_EXCLUDED_DIRS)
    for fname in sorted(filenames):
      if not fname.endswith(".py") or fname.startswith("test_") or fname.endswith("_test.py"):
        continue
      path = os.path.join(dirpath, fname)
      if os.path.islink(path) or os.path.getsize(path) > max_file_bytes:
        continue
      found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
  return sorted(found)


def code_py_units(max_file_bytes: int = 100_000, max_chars: int = 4000) -> Iterator[Unit]:
  """One unit per stdlib source file (sorted by path); documents are blank-line-separated blocks
  regrouped into chunks of <= max_chars characters, indentation preserved."""
  for rel, path in stdlib_files(max_file_bytes):
    try:
      with open(path, encoding="utf-8") as f:
        source = f.read()
    except UnicodeDecodeError:
      continue
    docs = group_paragraphs(source, max_chars)
    if docs:
      yield rel, docs


def code_py_fingerprint(max_file_bytes: int = 100_000) -> dict[str, Any]:
  files = stdlib_files(max_file_bytes)
  return {
    "python": f"{platform.python_implementation()} {platform.python_version()}",
    "files": len(files),
    "bytes": sum(os.path.getsize(p) for _, p in files),
  }


# --------------------------------------------------------------------------------------- dialog_en
def dialog_en_units() -> Iterator[Unit]:
  """One unit (and one document) per chitchat-dataset conversation with >= 2 turns; consecutive
  messages of one speaker are joined by a space, turns are separated by a newline."""
  chitchat = require_module("chitchat_dataset", "the dialog_en corpus")
  for conv_id, conv in chitchat.Dataset().items():
    turns = [
      " ".join(u["text"].strip() for u in message if u["text"].strip())
      for message in conv["messages"]
    ]
    turns = [t for t in turns if t]
    if len(turns) >= 2:
      yield conv_id, ["\n".join(turns)]


def dialog_en_fingerprint() -> dict[str, Any]:
  chitchat = require_module("chitchat_dataset", "the dialog_en corpus")
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  return {
    "chitchat_dataset": metadata.version("chitchat-dataset"),
    "bytes": os.path.getsize(os.path.join(os.path.dirname(chitchat.__file__), "dataset.json")),
  }


# ----------------------------------------------------------------------------------- fortunes_intl
def fortune_files(root: str | None = None) -> list[str]:
  """Fortune text files of the installed fortunes-de/-ru/-zh packages (sorted; index `.dat` files and
  `.u8` symlinks skipped) under `root` (default FORTUNES_ROOT). Raises MissingDebianPackagesError
  naming the missing packages."""
  root = root or FORTUNES_ROOT
  missing = [
    pkg
    for pkg, rels in FORTUNE_PACKAGES.items()
    if not any(os.path.exists(os.path.join(root, r)) for r in rels)
  ]
  if missing:
    raise MissingDebianPackagesError(missing)
  files = []
  for rels in FORTUNE_PACKAGES.values():
    for rel in rels:
      path = os.path.join(root, rel)
      candidates = (
        [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
      )
      for c in candidates:
        if os.path.isfile(c) and not os.path.islink(c) and not c.endswith((".dat", ".u8")):
          files.append(c)
  return sorted(files)


def fortunes_intl_units(max_chars: int = 1500) -> Iterator[Unit]:
  """German, Russian and Chinese fortunes (`%`-separated entries, ANSI colour codes stripped) grouped
  into documents of <= max_chars characters; every group is its own unit, so both splits mix the
  three languages."""
  for path in fortune_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      entries = [
        _ANSI.sub("", e).strip() for e in re.split(r"^%\s*$", f.read(), flags=re.MULTILINE)
      ]
    text = "\n\n".join(e.replace("\n\n", "\n") for e in entries if e)
    for i, doc in enumerate(group_paragraphs(text, max_chars)):
      yield f"{os.path.relpath(path, FORTUNES_ROOT)}#{i}", [doc]


def fortunes_intl_fingerprint() -> dict[str, Any]:
  files = fortune_files()
  return {"files": len(files), "bytes": sum(os.path.getsize(p) for p in files)}


# ------------------------------------------------------------------------------------- user files
TEXT_SUFFIXES = (".txt", ".jsonl")


def list_text_files(files: Iterable[str] | None = None, folder: str | None = None) -> list[str]:
  """Absolute paths of the user's corpus files: `files` as given, plus every *.txt / *.jsonl under
  `folder` (recursive, sorted). Raises ValueError/FileNotFoundError naming the offending path."""
  paths = [os.path.abspath(os.path.expanduser(p)) for p in (files or [])]
  if folder is not None:
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"Corpus folder {folder} does not exist.")
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames.sort()
      paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES)]
    if not paths:
      raise ValueError(f"Corpus folder {folder} contains no .txt or .jsonl files.")
  if not paths:
    raise ValueError("A text distribution needs `files=[...]` or `folder=...`.")
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"Corpus file {p} does not exist.")
    if not p.endswith(TEXT_SUFFIXES):
      raise ValueError(f"Corpus file {p}: unsupported extension; use .txt or .jsonl.")
  return sorted(dict.fromkeys(paths))


def read_text_file(path: str, txt_mode: str = "paragraphs", text_key: str = "text") -> list[str]:
  """Documents of one user file.

  `.txt`: `txt_mode="paragraphs"` -> one document per block separated by blank lines;
  `txt_mode="lines"` -> one document per non-empty line. `.jsonl`: one JSON object per line whose
  `text_key` field is the document. Raises ValueError naming the file when it holds no document or a
  line is malformed.
  """
  with open(path, encoding="utf-8") as f:
    content = f.read()
  if path.endswith(".jsonl"):
    docs = []
    for n, line in enumerate(content.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        text = record[text_key]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
          f"{path}:{n}: expected a JSON object with a string '{text_key}' field ({e!r})."
        ) from e
      if not isinstance(text, str):
        raise ValueError(f"{path}:{n}: field '{text_key}' is not a string.")
      if text.strip():
        docs.append(text.strip())
  elif txt_mode == "paragraphs":
    docs = [p.strip() for p in _PARAGRAPH_BREAK.split(content) if p.strip()]
  elif txt_mode == "lines":
    docs = [line.strip() for line in content.splitlines() if line.strip()]
  else:
    raise ValueError(f"txt_mode must be 'paragraphs' or 'lines', got {txt_mode!r}.")
  if not docs:
    raise ValueError(f"Corpus file {path} is empty: it contains no document.")
  return docs


def text_file_units(
  paths: Sequence[str], txt_mode: str = "paragraphs", text_key: str = "text"
) -> Iterator[Unit]:
  """One unit per document of the user's files, keyed `<path>#<index>`."""
  for path in paths:
    for i, doc in enumerate(read_text_file(path, txt_mode, text_key)):
      yield f"{path}#{i}", [doc]


def text_files_fingerprint(paths: Sequence[str]) -> dict[str, Any]:
  """Identifies a user corpus by path, size and modification time of each file."""
  return {"files": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]}
