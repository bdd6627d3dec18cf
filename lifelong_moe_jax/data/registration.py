"""Library functions that register language-modelling distributions as seqio tasks and mixtures.

A task module (``tasks/corpora.py`` by default, or any module named with the CLIs' ``--tasks_module``
flag) calls these functions at import time; the library itself never imports a task module.

- ``register_text_distribution``: your own .txt / .jsonl files -> task ``lifelong_<name>``, built
  through the same shard / TFDS path as the built-in corpora;
- ``register_tfds_distribution``: an existing TFDS dataset (C4, wiki40b on a cluster) -> task
  ``lifelong_<name>``;
- ``register_folder_distributions``: many folders at once (task modules expose it to gin);
- ``register_mixture``: a mixture over distributions or task names (equal, size or given rates);
- ``add_text_task``: a task over any ``seqio.DataSource`` with a string feature, preprocessed like
  the others.

Every task uses ``OUTPUT_FEATURES``: one feature ``targets`` over the shared lazy vocabulary
(``vocab.shared_vocabulary()``, SentencePiece or byte as chosen by gin ``get_vocabulary.kind``)
with EOS. Preprocessing: rekey ``text`` -> ``targets``, tokenize, append EOS, cut documents into
chunks of the target length (so no tokens are dropped by trimming); packing happens in the feature
converter (``pipeline.get_dataset``).

Registrations that depend on configuration parsed after import (gin bindings of folders) are
*deferred*: ``add_deferred_registration`` records them and ``pipeline.validate_task_name`` runs them
(``run_deferred_registrations``) before it resolves a name.

Every registration replaces an earlier one of the same name, so calling these functions again never
fails on a duplicate.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import seqio
import tensorflow as tf

from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import preprocessors
from lifelong_moe_jax.data import sources
from lifelong_moe_jax.data import tfds_builder
from lifelong_moe_jax.data import vocab

TASK_PREFIX = "lifelong_"

OUTPUT_FEATURES = {
  "targets": seqio.Feature(vocabulary=vocab.shared_vocabulary(), add_eos=True, dtype=tf.int32)
}

_user_registrations: dict[str, tuple[Any, ...]] = {}
_deferred: dict[str, Callable[[], Any]] = {}


def task_name(distribution: str) -> str:
  """``lifelong_<distribution>``; a name that already starts with the prefix is returned as is."""
  return distribution if distribution.startswith(TASK_PREFIX) else TASK_PREFIX + distribution


def text_preprocessors(text_key: str = "text") -> list[Callable[..., tf.data.Dataset]]:
  """The LM preprocessing chain for examples with a string feature ``text_key``."""
  return [
    functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos,
    preprocessors.split_tokens_to_length,
  ]


def add_text_task(name: str, source: seqio.DataSource, text_key: str = "text") -> seqio.Task:
  """Registers (or replaces) LM task ``name`` over ``source``'s string feature ``text_key``."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
    name,
    source=source,
    output_features=OUTPUT_FEATURES,
    preprocessors=text_preprocessors(text_key),
    metric_fns=[],
  )


def _rate_by_text_bytes(task: seqio.Task) -> float:
  """Mixing rate = train text bytes (MB) of the task's prepared distribution, read at use time."""
  source = task.source
  if isinstance(source, tfds_builder.LocalTextTfdsSource):
    marker = distributions.ensure_built(source.distribution)
    return marker["splits"]["train"]["text_bytes"] / 1e6
  return float(task.num_input_examples("train") or 1)


def register_mixture(
  name: str, members: Sequence[str] | Mapping[str, float], rate: str | float = "equal"
) -> seqio.Mixture:
  """Registers (or replaces) mixture ``name`` over distributions or task names.

  Args:
    name: mixture name.
    members: distribution names (``wiki_en``) or task names (``lifelong_wiki_en``); or
      ``{member: rate}`` with one positive rate per member (e.g. ``{"c4_en": 81, "wiki_en": 19}``:
      examples are drawn in proportion to the rates; ``rate`` is then not used).
    rate: ``"equal"`` (1.0 each), ``"size"`` (train text bytes of each prepared distribution), or
      a number.

  Returns:
    The registered seqio.Mixture.

  Raises:
    ValueError: a bad rate or a member that is not a registered task.
  """
  rates = None
  if isinstance(members, Mapping):
    bad = {
      m: r
      for m, r in members.items()
      if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0
    }
    if bad:
      raise ValueError(f"Mixture '{name}': rates must be positive numbers, got {bad}.")
    rates = {task_name(m): float(r) for m, r in members.items()}
    members = list(members)
  if rate == "equal":
    default_rate: Any = 1.0
  elif rate == "size":
    default_rate = _rate_by_text_bytes
  elif isinstance(rate, (int, float)):
    default_rate = float(rate)
  else:
    raise ValueError(f"rate must be 'equal', 'size' or a number, got {rate!r}.")
  names = [task_name(m) for m in members]
  missing = [n for n in names if n not in seqio.TaskRegistry.names()]
  if missing:
    registered = sorted(n for n in seqio.TaskRegistry.names() if n.startswith(TASK_PREFIX))
    raise ValueError(
      f"Mixture '{name}': unknown tasks {missing}. Registered lifelong tasks: {registered}."
    )
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  if rates is not None:
    return seqio.MixtureRegistry.add(name, [(n, rates[n]) for n in names])
  return seqio.MixtureRegistry.add(name, names, default_rate=default_rate)


def register_text_distribution(
  name: str,
  files: Iterable[str] | None = None,
  folder: str | None = None,
  *,
  validation_fraction: float = distributions.DEFAULT_VALIDATION_FRACTION,
  txt_mode: str = "paragraphs",
  text_key: str = "text",
  max_bytes: int | None = None,
  description: str = "",
  data_dir: str | None = None,
) -> seqio.Task:
  """Adds distribution ``name`` from your own files and registers task ``lifelong_<name>``.

  The files go through the same path as the built-in corpora: on first use they are split (per
  document, hashed, ``validation_fraction`` of the text to validation), written as JSONL shards to
  ``DIR/<name>/``, materialised as TFDS ``lifelong_text/<name>`` under ``DIR/tfds``, and read by
  seqio. A change to the files (size or mtime) rebuilds them.

  Args:
    name: lowercase identifier (not a built-in name).
    files: .txt / .jsonl files.
    folder: a folder whose *.txt / *.jsonl files (recursively) are used; may be combined with files.
    validation_fraction: share of text bytes held out for the validation split.
    txt_mode: for .txt files, ``"paragraphs"`` (documents separated by blank lines) or ``"lines"``
      (one document per line).
    text_key: field holding the document in .jsonl files.
    max_bytes: optional cap on the text used (a hash-spread sample of documents).
    description: free text, shown in the TFDS dataset info.
    data_dir: where to build; None resolves the data dir at use (flag / gin / env / ./data).

  Returns:
    The registered seqio.Task.

  Raises:
    ValueError / FileNotFoundError: bad name, missing folder or file, unsupported extension.
  """
  distributions.validate_name(name)
  file_list = tuple(files or ())
  sources.list_text_files(file_list, folder)  # fail early on missing paths
  if txt_mode not in ("paragraphs", "lines"):
    raise ValueError(f"txt_mode must be 'paragraphs' or 'lines', got {txt_mode!r}.")
  signature = (
    file_list,
    folder,
    validation_fraction,
    txt_mode,
    text_key,
    max_bytes,
    description,
    data_dir,
  )
  tname = task_name(name)
  if _user_registrations.get(name) == signature and tname in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(tname)

  def paths() -> list[str]:
    return sources.list_text_files(file_list, folder)

  spec = distributions.DistributionSpec(
    name=name,
    units_fn=lambda: sources.text_file_units(paths(), txt_mode, text_key),
    fingerprint_fn=lambda: sources.text_files_fingerprint(paths()),
    description=description or f"User text distribution '{name}'.",
    validation_fraction=validation_fraction,
    max_bytes=max_bytes,
    auto_build=True,
    options={"txt_mode": txt_mode, "text_key": text_key},
  )
  distributions.register_spec(spec)
  _user_registrations[name] = signature
  logging.debug("Registered text distribution %s as task %s.", name, tname)
  return add_text_task(tname, tfds_builder.LocalTextTfdsSource(name, data_dir))


def register_tfds_distribution(
  name: str,
  tfds_name: str,
  tfds_data_dir: str | None = None,
  *,
  text_key: str = "text",
  splits: Mapping[str, str] | None = None,
) -> seqio.Task:
  """Registers task ``lifelong_<name>`` over an already prepared TFDS dataset (C4, wiki40b, ...).

  Args:
    name: distribution name.
    tfds_name: e.g. ``"c4/en:3.0.1"`` or ``"wiki40b/en:1.3.0"`` (a version is required).
    tfds_data_dir: the cluster's TFDS data dir (None: TFDS's default).
    text_key: the dataset's text feature.
    splits: task split -> TFDS split, default ``{"train": "train", "validation": "validation"}``.

  Returns:
    The registered seqio.Task.
  """
  distributions.validate_name(name)
  source = seqio.TfdsDataSource(
    tfds_name=tfds_name,
    tfds_data_dir=tfds_data_dir,
    splits=dict(splits or {"train": "train", "validation": "validation"}),
    read_only=True,
  )
  return add_text_task(task_name(name), source, text_key=text_key)


def register_folder_distributions(
  folders: Mapping[str, str] | None = None,
  validation_fraction: float = distributions.DEFAULT_VALIDATION_FRACTION,
  txt_mode: str = "paragraphs",
  text_key: str = "text",
  mixtures: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
  """Every ``name: folder`` in ``folders`` becomes task ``lifelong_<name>``.

  ``tasks/corpora.py`` exposes this function to gin (``register_folder_distributions.folders``)
  and defers it (``add_deferred_registration``), so a .gin file alone is enough::

      register_folder_distributions.folders = {"legal": "/data/legal_txt"}
      register_folder_distributions.mixtures = {"wiki_and_legal": ["wiki_en", "legal"]}

  Args:
    folders: distribution name -> folder of .txt / .jsonl files.
    validation_fraction: as in ``register_text_distribution``.
    txt_mode: as in ``register_text_distribution``.
    text_key: as in ``register_text_distribution``.
    mixtures: mixture name -> members, registered at equal rates after the folders.

  Returns:
    The registered task names.
  """
  names = [
    register_text_distribution(
      name,
      folder=folder,
      validation_fraction=validation_fraction,
      txt_mode=txt_mode,
      text_key=text_key,
    ).name
    for name, folder in sorted((folders or {}).items())
  ]
  for mixture, members in sorted((mixtures or {}).items()):
    register_mixture(mixture, members)
  return names


def add_deferred_registration(key: str, fn: Callable[[], Any]) -> None:
  """Records ``fn`` to run before the data pipeline resolves a task name.

  For registrations that depend on configuration parsed after the task module was imported (the
  gin-configured ``register_folder_distributions``). ``fn`` must be idempotent: it runs before
  every lookup. A later call with the same ``key`` replaces the earlier function.
  """
  _deferred[key] = fn


def run_deferred_registrations() -> None:
  """Runs every function recorded by ``add_deferred_registration`` (in the order recorded)."""
  for fn in list(_deferred.values()):
    fn()
