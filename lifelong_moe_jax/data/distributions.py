"""Registry of text distributions and the deterministic build of one distribution into shards.

A `DistributionSpec` says where a distribution's text comes from (a unit reader, see `sources.py`) and
how to split it. Built-in specs: the defaults `wiki_en`, `code_py`, `dialog_en` and the optional
`fortunes_intl`. `register_spec` adds user distributions (what `tasks.register_text_distribution` uses).

Build (`build_distribution`), deterministic given the source files:
1. read all units in source order; drop exact duplicate documents (first occurrence kept) and units
   left empty, so no text can be in both splits;
2. if the text exceeds `max_bytes`, keep the units that come first in sha256(key) order until the
   budget is reached (a spread-out sample rather than a prefix), in source order;
3. validation = units taken in sha256("validation/" + key) order until their text reaches
   `validation_fraction` of the total (at least one unit; train keeps at least one);
4. write JSONL shards + marker (`shards.write_distribution`).
A complete earlier build with the same config is reused (`status == "reused"`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

from absl import logging

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import sources

DEFAULT_DISTRIBUTIONS = ("wiki_en", "code_py", "dialog_en")
OPTIONAL_DISTRIBUTIONS = ("fortunes_intl",)
DEFAULT_MAX_BYTES = (
  4 << 20
)  # cap per distribution: keeps prepare fast and the three sizes comparable
DEFAULT_VALIDATION_FRACTION = 0.05
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class DistributionSpec:
  """How to build one distribution.

  Attributes:
    name: lowercase identifier; the seqio task is `lifelong_<name>`.
    units_fn: returns an iterator of `(key, [documents])` units (see sources.py).
    fingerprint_fn: returns a JSON-able dict identifying the source version; a change rebuilds.
    description: one line for docs and the TFDS builder.
    validation_fraction: target share of text bytes in the validation split.
    max_bytes: cap on total text bytes (None: no cap).
    builtin: True for the distributions `prepare` builds from packages.
    auto_build: True when loaders may (re)build it on first use (user files: cheap, no packages).
    options: extra JSON-able settings recorded in the marker config.
  """

  name: str
  units_fn: Callable[[], Iterable[sources.Unit]]
  fingerprint_fn: Callable[[], Mapping[str, Any]]
  description: str = ""
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION
  max_bytes: int | None = DEFAULT_MAX_BYTES
  builtin: bool = False
  auto_build: bool = False
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def config(self) -> dict[str, Any]:
    """What the marker records and a reuse check compares."""
    return {
      "validation_fraction": self.validation_fraction,
      "max_bytes": self.max_bytes,
      "source": dict(self.fingerprint_fn()),
      "options": dict(self.options),
    }


def validate_name(name: str) -> None:
  """Raises ValueError unless `name` is a lowercase identifier."""
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError(
      f"Distribution name {name!r} must match {_NAME.pattern} (lowercase, digits, _)."
    )


_BUILTIN_SPECS: dict[str, DistributionSpec] = {
  "wiki_en": DistributionSpec(
    "wiki_en",
    sources.wiki_en_units,
    sources.wiki_en_fingerprint,
    builtin=True,
    description="English Wikipedia articles from gensim's enwiki test sample (markup stripped).",
  ),
  "code_py": DistributionSpec(
    "code_py",
    sources.code_py_units,
    sources.code_py_fingerprint,
    builtin=True,
    description="Python standard library source of the running interpreter, tests excluded.",
  ),
  "dialog_en": DistributionSpec(
    "dialog_en",
    sources.dialog_en_units,
    sources.dialog_en_fingerprint,
    builtin=True,
    description="chitchat-dataset conversations, one per document, one turn per line.",
  ),
  "fortunes_intl": DistributionSpec(
    "fortunes_intl",
    sources.fortunes_intl_units,
    sources.fortunes_intl_fingerprint,
    builtin=True,
    description="German, Russian and Chinese fortunes from Debian's fortunes-de/-ru/-zh.",
  ),
}
_USER_SPECS: dict[str, DistributionSpec] = {}


def register_spec(spec: DistributionSpec) -> None:
  """Adds or replaces a user distribution; built-in names cannot be replaced."""
  validate_name(spec.name)
  if spec.name in _BUILTIN_SPECS:
    raise ValueError(f"'{spec.name}' is a built-in distribution; choose another name.")
  _USER_SPECS[spec.name] = spec


def get_spec(name: str) -> DistributionSpec:
  """The spec of a built-in or registered distribution; ValueError listing known names otherwise."""
  spec = _BUILTIN_SPECS.get(name) or _USER_SPECS.get(name)
  if spec is None:
    raise ValueError(f"Unknown distribution '{name}'. Known: {sorted(known_distributions())}.")
  return spec


def known_distributions() -> list[str]:
  """Names of built-in and registered distributions."""
  return list(_BUILTIN_SPECS) + sorted(_USER_SPECS)


def _sha(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dedup(units: Iterable[sources.Unit]) -> Iterator[tuple[str, list[str], int]]:
  seen: set[str] = set()
  keys: set[str] = set()
  for key, docs in units:
    if key in keys:
      raise ValueError(f"Duplicate unit key {key!r}.")
    keys.add(key)
    kept = []
    for doc in docs:
      digest = _sha(doc)
      if doc.strip() and digest not in seen:
        seen.add(digest)
        kept.append(doc)
    if kept:
      yield key, kept, sum(len(d.encode("utf-8")) for d in kept)


def split_units(
  units: Iterable[sources.Unit], validation_fraction: float, max_bytes: int | None
) -> dict[str, list[str]]:
  """Steps 1-3 of the module docstring: returns {"train": docs, "validation": docs}."""
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
  items = list(_dedup(units))
  if len(items) < 2:
    raise ValueError(
      f"Need at least 2 distinct documents to make train and validation splits, got {len(items)}."
    )
  total = sum(size for _, _, size in items)
  if max_bytes is not None and total > max_bytes:
    chosen: set[str] = set()
    budget = 0
    for key, _, size in sorted(items, key=lambda it: _sha(it[0])):
      if budget >= max_bytes:
        break
      chosen.add(key)
      budget += size
    items = [it for it in items if it[0] in chosen]
    total = budget
  validation: set[str] = set()
  val_bytes = 0
  for key, _, size in sorted(items, key=lambda it: _sha("validation/" + it[0])):
    if val_bytes >= validation_fraction * total or len(validation) == len(items) - 1:
      break
    validation.add(key)
    val_bytes += size
  return {
    "train": [d for key, docs, _ in items if key not in validation for d in docs],
    "validation": [d for key, docs, _ in items if key in validation for d in docs],
  }


@dataclasses.dataclass(frozen=True)
class BuildResult:
  """Outcome of `build_distribution`: status is "built" or "reused"."""

  name: str
  status: str
  path: str
  marker: Mapping[str, Any]


def build_distribution(name: str, data_dir: str | None = None, force: bool = False) -> BuildResult:
  """Builds (or reuses) distribution `name` under `<data_dir>/<name>`.

  Reuse requires a marker whose shards all match their size and sha256 and whose config (source
  fingerprint, validation fraction, cap) equals the spec's. Anything else, including an interrupted
  build, is rebuilt from scratch.
  """
  spec = get_spec(name)
  out_dir = data_dir_lib.distribution_dir(name, data_dir)
  config = spec.config()
  if not force:
    try:
      marker = shards.verify_distribution(out_dir)
      if marker.get("config") == config:
        return BuildResult(name, "reused", out_dir, marker)
      logging.info(
        "Distribution %s at %s was built with another config or source; rebuilding.", name, out_dir
      )
    except shards.IncompleteBuildError as e:
      if os.path.exists(out_dir):
        logging.warning("Distribution %s at %s is incomplete (%s); rebuilding.", name, out_dir, e)
  try:
    splits = split_units(spec.units_fn(), spec.validation_fraction, spec.max_bytes)
  except ValueError as e:
    raise ValueError(f"Distribution '{name}': {e}") from e
  marker = shards.write_distribution(out_dir, name, splits, config)
  return BuildResult(name, "built", out_dir, marker)


def ensure_built(name: str, data_dir: str | None = None) -> dict[str, Any]:
  """Returns the verified marker of `name`, building it first when the spec allows (user files).

  Raises:
    shards.IncompleteBuildError: for a built-in distribution that is not (completely) prepared, with
      the prepare command to run.
  """
  spec = get_spec(name)
  if spec.auto_build:
    root = data_dir_lib.resolve_data_dir(data_dir)
    with shards.dir_lock(root):
      return dict(build_distribution(name, root).marker)
  out_dir = data_dir_lib.distribution_dir(name, data_dir)
  try:
    return _verified_marker(out_dir, _mtime_key(out_dir))
  except shards.IncompleteBuildError as e:
    raise shards.IncompleteBuildError(
      f"{e}\nPrepare the data first: python -m lifelong_moe_jax.data.prepare --data_dir "
      f"{data_dir_lib.resolve_data_dir(data_dir)} --distributions {name}"
    ) from e


def _mtime_key(dist_dir: str) -> tuple[int, int]:
  try:
    st = os.stat(os.path.join(dist_dir, shards.MARKER))
    return st.st_mtime_ns, st.st_ino
  except FileNotFoundError:
    return 0, 0


@functools.lru_cache(maxsize=64)
def _verified_marker_cached(dist_dir: str, key: tuple[int, int]) -> dict[str, Any]:
  del key  # part of the cache key only: a rebuilt marker has a new mtime/inode
  return shards.verify_distribution(dist_dir)


def _verified_marker(dist_dir: str, key: tuple[int, int]) -> dict[str, Any]:
  if key == (0, 0):
    return shards.verify_distribution(dist_dir)  # raises with the precise reason
  return _verified_marker_cached(dist_dir, key)
