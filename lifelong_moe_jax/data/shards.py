"""On-disk format of one prepared distribution: JSONL shards plus a completion marker.

Layout of `DIR/<name>/`:

    train-00000-of-00004.jsonl ... train-00003-of-00004.jsonl
    validation-00000-of-00001.jsonl
    COMPLETE.json

Each shard line is one document: `{"text": "<document, newlines kept inside the JSON string>"}`.
`COMPLETE.json` is written last (atomically, by rename) and lists every shard with its size in bytes and
sha256, the number of documents and text bytes per split, and the build configuration. A folder without
a marker, or whose shards do not match their marker, is an incomplete build: `prepare` rebuilds it and
the loaders refuse it.

Builds happen in a sibling scratch folder `DIR/.<name>.partial` that is renamed into place only after
the marker is written, so an interrupted build never leaves a half-written `DIR/<name>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import threading
from typing import Any, Iterator, Mapping, Sequence

MARKER = "COMPLETE.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DEFAULT_SHARD_BYTES = 1 << 20  # about 1 MiB of text per train shard


class IncompleteBuildError(FileNotFoundError):
  """A prepared distribution is missing, half-written or corrupted."""


_lock_state = threading.local()


@contextlib.contextmanager
def dir_lock(root: str) -> Iterator[None]:
  """Exclusive advisory lock on `root/.lock` (re-entrant within a thread), so that two processes
  preparing the same data dir (e.g. parallel test runs) do not interleave their builds."""
  depths = _lock_state.__dict__.setdefault("depths", {})
  key = os.path.abspath(root)
  if depths.get(key):
    depths[key] += 1
    try:
      yield
    finally:
      depths[key] -= 1
    return
  os.makedirs(key, exist_ok=True)
  with open(os.path.join(key, ".lock"), "a+", encoding="utf-8") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    depths[key] = 1
    try:
      yield
    finally:
      depths[key] = 0
      fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: str) -> str:
  """sha256 hex digest of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def shard_name(split: str, index: int, count: int) -> str:
  """`train-00000-of-00004.jsonl`."""
  return f"{split}-{index:05d}-of-{count:05d}.jsonl"


def _plan_shards(documents: Sequence[str], shard_bytes: int) -> list[list[str]]:
  """Cuts `documents` (in order) into contiguous groups of roughly `shard_bytes` text bytes each."""
  sizes = [len(d.encode("utf-8")) for d in documents]
  total = sum(sizes)
  count = max(1, min(len(documents), math.ceil(total / shard_bytes)))
  groups: list[list[str]] = [[] for _ in range(count)]
  seen = 0
  for doc, size in zip(documents, sizes):
    index = min(count - 1, int(seen * count / max(total, 1)))
    groups[index].append(doc)
    seen += size
  return [g for g in groups if g] or [[]]


def write_distribution(
  out_dir: str,
  name: str,
  splits: Mapping[str, Sequence[str]],
  config: Mapping[str, Any],
  shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
  """Writes `splits` (split name -> documents) as JSONL shards + marker into `out_dir`, atomically.

  Args:
    out_dir: final folder `DIR/<name>`; replaced when it already exists.
    name: distribution name, recorded in the marker.
    splits: documents per split; every split must be non-empty.
    config: build configuration recorded in the marker (what a rebuild compares against).
    shard_bytes: target text bytes per shard.

  Returns:
    The marker dict that was written.
  """
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(parent, f".{name}.partial")
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  marker: dict[str, Any] = {
    "name": name,
    "format": "jsonl",
    "format_version": FORMAT_VERSION,
    "config": dict(config),
    "splits": {},
  }
  for split, documents in splits.items():
    if not documents:
      raise ValueError(f"Distribution '{name}': split '{split}' has no documents.")
    groups = _plan_shards(documents, shard_bytes)
    files = []
    for index, group in enumerate(groups):
      fname = shard_name(split, index, len(groups))
      path = os.path.join(partial, fname)
      with open(path, "w", encoding="utf-8") as f:
        for doc in group:
          f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
      files.append(
        {
          "name": fname,
          "bytes": os.path.getsize(path),
          "sha256": file_sha256(path),
          "num_documents": len(group),
        }
      )
    marker["splits"][split] = {
      "num_documents": len(documents),
      "text_bytes": sum(len(d.encode("utf-8")) for d in documents),
      "files": files,
    }
  tmp_marker = os.path.join(partial, MARKER + ".tmp")
  with open(tmp_marker, "w", encoding="utf-8") as f:
    json.dump(marker, f, indent=1, sort_keys=True)
  os.replace(tmp_marker, os.path.join(partial, MARKER))
  old = os.path.join(parent, f".{name}.old")
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(out_dir):
    os.rename(out_dir, old)
  os.rename(partial, out_dir)
  shutil.rmtree(old, ignore_errors=True)
  return marker


def read_marker(dist_dir: str) -> dict[str, Any]:
  """Loads `dist_dir/COMPLETE.json`; raises IncompleteBuildError naming the file when absent or bad."""
  path = os.path.join(dist_dir, MARKER)
  if not os.path.exists(path):
    raise IncompleteBuildError(
      f"No completion marker {path}: the distribution is not prepared "
      "(or its build was interrupted)."
    )
  try:
    with open(path, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError) as e:
    raise IncompleteBuildError(f"Unreadable completion marker {path}: {e}") from e
  if marker.get("format_version") != FORMAT_VERSION:
    raise IncompleteBuildError(
      f"{path} has format_version {marker.get('format_version')}, expected "
      f"{FORMAT_VERSION}: rebuild it."
    )
  return marker


def verify_distribution(dist_dir: str, check_sha256: bool = True) -> dict[str, Any]:
  """Checks that every shard listed in the marker exists with the recorded size (and sha256).

  Returns:
    The marker dict.

  Raises:
    IncompleteBuildError: naming the first missing or mismatching file, or a missing split.
  """
  marker = read_marker(dist_dir)
  for split in SPLITS:
    if split not in marker.get("splits", {}):
      raise IncompleteBuildError(f"{os.path.join(dist_dir, MARKER)} lists no '{split}' split.")
  for split, info in marker["splits"].items():
    for entry in info["files"]:
      path = os.path.join(dist_dir, entry["name"])
      if not os.path.exists(path):
        raise IncompleteBuildError(f"Missing shard {path} of split '{split}'.")
      if os.path.getsize(path) != entry["bytes"]:
        raise IncompleteBuildError(
          f"Shard {path} has {os.path.getsize(path)} bytes, marker says {entry['bytes']} "
          "(truncated or modified)."
        )
      if check_sha256 and file_sha256(path) != entry["sha256"]:
        raise IncompleteBuildError(f"Shard {path} does not match its sha256 in the marker.")
  return marker


def split_files(dist_dir: str, split: str, marker: Mapping[str, Any] | None = None) -> list[str]:
  """Absolute shard paths of `split`, in order; raises IncompleteBuildError naming what is missing."""
  marker = marker or read_marker(dist_dir)
  if split not in marker["splits"]:
    raise IncompleteBuildError(
      f"Split '{split}' is not listed in {os.path.join(dist_dir, MARKER)}; "
      f"available: {sorted(marker['splits'])}."
    )
  paths = [os.path.join(dist_dir, e["name"]) for e in marker["splits"][split]["files"]]
  for path in paths:
    if not os.path.exists(path):
      raise IncompleteBuildError(f"Missing shard {path} of split '{split}'.")
  return paths


def iter_documents(paths: Sequence[str]) -> Iterator[tuple[str, int, str]]:
  """Yields (path, line_number, text) for every document of the given JSONL shards."""
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line_number, line in enumerate(f):
        if line.strip():
          yield path, line_number, json.loads(line)["text"]


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  """Size of one split of a prepared distribution."""

  num_documents: int
  text_bytes: int
  num_shards: int


def summarize(marker: Mapping[str, Any]) -> dict[str, SplitSummary]:
  """Split name -> SplitSummary, from a marker dict."""
  return {
    split: SplitSummary(info["num_documents"], info["text_bytes"], len(info["files"]))
    for split, info in marker["splits"].items()
  }
