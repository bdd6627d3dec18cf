"""Integrity manifests of checkpoint step folders: write, verify, move aside, find the newest intact.

Every saved step gets ``<step>/_MANIFEST.json``, written once orbax has finalized the step::

    {"format": "lifelong_moe_jax.checkpoint_manifest", "version": 1, "step": 8,
     "algorithm": "sha256", "total_bytes": 123456, "num_files": 17,
     "files": {"_CHECKPOINT_METADATA": {"size": 421, "sha256": "9f2c..."},
               "state/_METADATA": {"size": 685, "sha256": "..."}, ...}}

``files`` lists every file of the step folder (relative POSIX paths) except the manifest itself.

Verification levels:

* ``"full"``: every listed file exists with the recorded size and checksum (reads every byte);
* ``"sizes"``: every listed file exists with the recorded size (a listing and one stat per file).

A step without a manifest is *unverified*, not damaged: a process may stop between orbax's finalize
and the manifest write, and checkpoints written before manifests existed have none. Such a step must
still hold its ``required`` files (JSON files that parse); its arrays are then checked by reading
them, and a read failure counts as damage like a manifest mismatch.

Damaged steps are never deleted: ``move_aside`` renames ``<step>`` to ``<step>.damaged-<n>``, a name
outside orbax's step pattern, so orbax no longer lists it and a later save can reuse the step.

Everything here is a pure function of the folder (no jax, no orbax), so it is safe to call from any
process or thread; callers decide which process writes or renames.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import uuid
from typing import Any, Iterable, Sequence

from etils import epath

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "lifelong_moe_jax.checkpoint_manifest"
MANIFEST_VERSION = 1
ALGORITHM = "sha256"
DAMAGED_TAG = ".damaged-"
LEVELS = ("full", "sizes")
INTACT, UNVERIFIED, DAMAGED = "intact", "unverified", "damaged"
_CHUNK = 8 << 20
_TMP_TAG = ".tmp-"


class CheckpointDamagedError(RuntimeError):
  """A checkpoint step's files are damaged or unreadable (and no intact step could replace it)."""


@dataclasses.dataclass(frozen=True)
class Verification:
  """The outcome of checking one step folder.

  Attributes:
    step_dir: the folder checked.
    status: ``"intact"`` (matches its manifest), ``"unverified"`` (no manifest, required files
      present) or ``"damaged"``.
    problem: for damaged steps, the first problem found (e.g. ``"state/_METADATA: missing"``),
      with the number of further problems.
  """

  step_dir: str
  status: str
  problem: str | None = None

  @property
  def ok(self) -> bool:
    return self.status != DAMAGED

  @property
  def step_name(self) -> str:
    return epath.Path(self.step_dir).name


# ------------------------------------------------------------------------------------ files
def _is_local(path: epath.PathLike) -> bool:
  return "://" not in os.fspath(path)


def list_files(step_dir: epath.PathLike) -> list[str]:
  """Relative POSIX paths of every file under ``step_dir``, sorted; the manifest (and its
  temporary files) excluded."""
  root = epath.Path(step_dir)
  found = []
  if _is_local(root):
    for dirpath, _, filenames in os.walk(os.fspath(root)):
      rel = os.path.relpath(dirpath, os.fspath(root))
      for name in filenames:
        found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
  else:
    pending = [(root, "")]
    while pending:
      folder, prefix = pending.pop()
      for child in folder.iterdir():
        rel = f"{prefix}{child.name}"
        if child.is_dir():
          pending.append((child, rel + "/"))
        else:
          found.append(rel)
  return sorted(f for f in found if not f.startswith(MANIFEST_NAME))


def _size(path: epath.Path) -> int | None:
  try:
    return os.stat(os.fspath(path)).st_size if _is_local(path) else path.stat().length
  except (FileNotFoundError, NotADirectoryError):
    return None


def file_checksum(path: epath.PathLike) -> str:
  """Hex ``sha256`` of a file, read in 8 MiB chunks."""
  digest = hashlib.new(ALGORITHM)
  # Local files through the builtin open (epath may route them through tf.io.gfile).
  with open(os.fspath(path), "rb") if _is_local(path) else epath.Path(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _default_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def _checksums(
  root: epath.Path, names: Sequence[str], sizes: dict[str, int], workers: int | None
) -> dict[str, str]:
  """``{name: checksum}``, hashed in a thread pool (hashlib releases the GIL), largest first."""
  order = sorted(names, key=lambda n: -sizes.get(n, 0))
  with concurrent.futures.ThreadPoolExecutor(workers or _default_workers()) as pool:
    return dict(zip(order, pool.map(lambda n: file_checksum(root / n), order)))


# ------------------------------------------------------------------------------------ manifest
def build_manifest(
  step_dir: epath.PathLike, step: int | None = None, *, workers: int | None = None
) -> dict[str, Any]:
  """The manifest of ``step_dir`` as it is now (sizes and checksums of every file)."""
  root = epath.Path(step_dir)
  names = list_files(root)
  sizes = {n: _size(root / n) for n in names}
  missing = [n for n, s in sizes.items() if s is None]
  if missing:
    raise FileNotFoundError(f"{root / missing[0]} vanished while building the manifest.")
  sums = _checksums(root, names, sizes, workers)
  return {
    "format": MANIFEST_FORMAT,
    "version": MANIFEST_VERSION,
    "step": None if step is None else int(step),
    "algorithm": ALGORITHM,
    "total_bytes": sum(sizes.values()),
    "num_files": len(names),
    "files": {n: {"size": sizes[n], ALGORITHM: sums[n]} for n in names},
  }


def write_manifest(
  step_dir: epath.PathLike, step: int | None = None, *, workers: int | None = None
) -> dict[str, Any]:
  """Builds the manifest of a finalized step folder and writes it atomically (temporary file, then
  rename); returns it. Call only once the step is final: files written later are not covered."""
  root = epath.Path(step_dir)
  manifest = build_manifest(root, step, workers=workers)
  tmp = root / f"{MANIFEST_NAME}{_TMP_TAG}{uuid.uuid4().hex}"
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
  tmp.replace(root / MANIFEST_NAME)
  return manifest


def read_manifest(step_dir: epath.PathLike) -> dict[str, Any] | None:
  """The step's manifest, or None when it has none.

  Raises:
    ValueError: the manifest exists but is unreadable or not a manifest of this format.
  """
  path = epath.Path(step_dir) / MANIFEST_NAME
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    manifest = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{MANIFEST_NAME}: not valid JSON ({e})") from e
  if (
    not isinstance(manifest, dict)
    or manifest.get("format") != MANIFEST_FORMAT
    or not isinstance(manifest.get("files"), dict)
  ):
    raise ValueError(f"{MANIFEST_NAME}: not a {MANIFEST_FORMAT} file")
  if manifest.get("version") != MANIFEST_VERSION or manifest.get("algorithm") != ALGORITHM:
    raise ValueError(
      f"{MANIFEST_NAME}: unsupported version {manifest.get('version')!r} / "
      f"algorithm {manifest.get('algorithm')!r}"
    )
  return manifest


# ------------------------------------------------------------------------------------ verifying
def _summary(problems: Sequence[str]) -> str | None:
  if not problems:
    return None
  more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
  return problems[0] + more


def _check_required(root: epath.Path, required: Iterable[str]) -> list[str]:
  problems = []
  for name in required:
    try:
      json.loads((root / name).read_text())
    except FileNotFoundError:
      problems.append(f"{name}: missing")
    except (ValueError, UnicodeDecodeError):
      problems.append(f"{name}: not valid JSON")
    except OSError as e:
      problems.append(f"{name}: unreadable ({e.__class__.__name__})")
  return problems


def verify_step(
  step_dir: epath.PathLike,
  *,
  level: str = "full",
  required: Sequence[str] = (),
  workers: int | None = None,
) -> Verification:
  """Checks a step folder against its manifest.

  Args:
    step_dir: the step folder.
    level: ``"full"`` (sizes and checksums) or ``"sizes"`` (sizes only).
    required: files (JSON) every step must hold, checked whether or not there is a manifest.
    workers: hashing threads (default: up to 8, one per CPU).
  Returns:
    A ``Verification``; never raises for damage.
  """
  if level not in LEVELS:
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
  root = epath.Path(step_dir)
  if not root.is_dir():
    return Verification(str(root), DAMAGED, "step folder missing")
  try:
    manifest = read_manifest(root)
  except (ValueError, OSError) as e:
    return Verification(str(root), DAMAGED, str(e))
  problems = _check_required(root, required)
  if manifest is None:
    return Verification(str(root), DAMAGED if problems else UNVERIFIED, _summary(problems))
  files = manifest["files"]
  sizes = {n: _size(root / n) for n in files}
  for name, entry in files.items():
    size = sizes[name]
    if size is None:
      problems.append(f"{name}: missing")
    elif size != entry.get("size"):
      problems.append(f"{name}: {size} bytes, manifest says {entry.get('size')}")
  if not problems and level == "full":
    sums = _checksums(root, list(files), sizes, workers)
    problems += [
      f"{name}: {ALGORITHM} differs from the manifest"
      for name in files
      if sums[name] != files[name].get(ALGORITHM)
    ]
  if problems:
    return Verification(str(root), DAMAGED, _summary(list(dict.fromkeys(problems))))
  return Verification(str(root), INTACT)


# ------------------------------------------------------------------------------------ damage
def move_aside(step_dir: epath.PathLike) -> str:
  """Renames a damaged step folder to ``<step>.damaged-<n>`` (first free n >= 1); returns the new
  path. Nothing is deleted."""
  root = epath.Path(step_dir)
  n = 1
  while (target := root.parent / f"{root.name}{DAMAGED_TAG}{n}").exists():
    n += 1
  root.rename(target)
  return str(target)


def damaged_folders(directory: epath.PathLike) -> list[str]:
  """Names of the folders ``move_aside`` left under a checkpoints directory, sorted."""
  root = epath.Path(directory)
  if not root.exists():
    return []
  return sorted(p.name for p in root.iterdir() if DAMAGED_TAG in p.name)


def find_intact_step(
  directory: epath.PathLike,
  steps: Iterable[int],
  *,
  level: str = "full",
  required: Sequence[str] = (),
  workers: int | None = None,
) -> tuple[int | None, list[Verification]]:
  """The newest of ``steps`` whose folder under ``directory`` verifies (intact or unverified), and
  the damaged steps newer than it (newest first). Moves nothing."""
  damaged = []
  for step in sorted(steps, reverse=True):
    result = verify_step(
      epath.Path(directory) / str(step), level=level, required=required, workers=workers
    )
    if result.ok:
      return step, damaged
    damaged.append(result)
  return None, damaged


def describe(damaged: Sequence[Verification]) -> str:
  """``"8 (state/_METADATA: missing)"`` / ``"8 (...), 6 (...)"``: the damaged steps and why."""
  return ", ".join(f"{d.step_name} ({d.problem})" for d in damaged)


def fallback_warning(
  damaged: Sequence[Verification], moved_to: Sequence[str] | None, step: int
) -> str:
  """The one warning logged when training falls back past damaged steps to ``step``."""
  noun = "step" if len(damaged) == 1 else "steps"
  verb = "is" if len(damaged) == 1 else "are"
  moved = f"; moved aside to {', '.join(moved_to)}" if moved_to else ""
  return (
    f"Checkpoint {noun} {describe(damaged)} {verb} damaged{moved}; using the newest intact "
    f"step {step} instead."
  )


def none_intact_message(directory: epath.PathLike, damaged: Sequence[Verification]) -> str:
  """The one-line error when every step of a checkpoints directory is damaged."""
  newest, older = damaged[0], damaged[1:]
  rest = (
    f"; older steps are damaged too: {describe(older)}" if older else "; there is no older step"
  )
  return (
    f"Checkpoint step {newest.step_name} in {directory} is damaged ({newest.problem}){rest}. "
    "Nothing was moved. Restore the step folders from a backup, or move them out of "
    f"{directory} to start the run over."
  )
