"""TensorFlow Datasets view of the prepared distributions, and the seqio source that reads it.

`LifelongText` is a `tfds.core.GeneratorBasedBuilder` whose config name is the distribution; it reads
the JSONL shards of `DIR/<name>/` and writes a regular TFDS dataset to
`DIR/tfds/lifelong_text/<name>/1.0.0/` (features: `{"text": tf.string}`; splits: train, validation).
`materialize` (re)generates it when missing or built from an older version of the shards (a stamp
holding the sha256 of the shards' marker sits next to the version folder); `prepare` calls it for every
distribution and loaders call it lazily.

`LocalTextTfdsSource` is a `seqio.TfdsDataSource` whose TFDS data dir is resolved when a dataset is
built (not when the task is registered), so `import tasks` can precede choosing the data dir. For data
that already lives in a cluster `tfds_data_dir` (C4, wiki40b), tasks use a plain `seqio.TfdsDataSource`
on the same path (see `tasks.register_tfds_distribution`).

The builder class is not put in TFDS's global registry (so re-importing this module never clashes);
`tfds.builder("lifelong_text/wiki_en:1.0.0", data_dir="DIR/tfds")` still reads a materialised dataset
from its files.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Iterator, Mapping

import seqio
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core.utils import tqdm_utils

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import shards

BUILDER_NAME = "lifelong_text"
VERSION = "1.0.0"
_STAMP = ".source_marker_sha256"
_BUILDERS: dict[tuple[str, str, str], tfds.core.DatasetBuilder] = {}


def tfds_name(distribution: str) -> str:
  """`lifelong_text/<distribution>:1.0.0`."""
  return f"{BUILDER_NAME}/{distribution}:{VERSION}"


class LifelongText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One prepared text distribution (config name = distribution name) as a TFDS dataset."""

  name = BUILDER_NAME
  RELEASE_NOTES = {VERSION: "JSONL shards written by lifelong_moe_jax.data.prepare."}
  VERSION = tfds.core.Version(VERSION)

  _CONFIGS: dict[str, tfds.core.BuilderConfig] = {}

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  @classmethod
  def config_for(cls, distribution: str) -> tfds.core.BuilderConfig:
    """The (memoised) BuilderConfig of a distribution; known configs are not "custom" to TFDS."""
    description = distributions.get_spec(distribution).description
    config = cls._CONFIGS.get(distribution)
    if config is None or config.description != description:
      config = tfds.core.BuilderConfig(name=distribution, version=VERSION, description=description)
      cls._CONFIGS[distribution] = config
    return config

  @classmethod
  def get_builder_config(cls, name: str, version: Any = None) -> tfds.core.BuilderConfig | None:
    del version
    return cls._CONFIGS.get(name)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Mapping[str, Iterator]:
    del dl_manager  # everything is local
    marker = shards.verify_distribution(self._source_dir)
    return {
      split: self._generate_examples(shards.split_files(self._source_dir, split, marker))
      for split in shards.SPLITS
    }

  def _generate_examples(self, paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    for path, line_number, text in shards.iter_documents(paths):
      yield f"{os.path.basename(path)}:{line_number}", {"text": text}


def _download_config() -> tfds.download.DownloadConfig:
  # Never look for a prepared copy on GCS: nothing may reach the network.
  return tfds.download.DownloadConfig(try_download_gcs=False)


def materialize(distribution: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns a ready TFDS builder for `distribution`, generating `DIR/tfds/...` when needed.

  User-registered distributions are (re)built from their files first; built-in ones must have been
  prepared (else `shards.IncompleteBuildError` with the prepare command).
  """
  root = data_dir_lib.resolve_data_dir(data_dir)
  distributions.ensure_built(distribution, root)
  dist_dir = data_dir_lib.distribution_dir(distribution, root)
  build_id = shards.file_sha256(os.path.join(dist_dir, shards.MARKER))
  key = (distribution, root, build_id)
  if key in _BUILDERS:
    return _BUILDERS[key]

  def make() -> tfds.core.DatasetBuilder:
    return LifelongText(
      source_dir=dist_dir,
      config=LifelongText.config_for(distribution),
      data_dir=data_dir_lib.tfds_dir(root),
    )

  with shards.dir_lock(root):
    builder = _materialize_locked(distribution, build_id, make)
  _BUILDERS[key] = builder
  return builder


def _read_stamp(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except FileNotFoundError:
    return None


def _materialize_locked(
  distribution: str, build_id: str, make: Callable[[], tfds.core.DatasetBuilder]
) -> tfds.core.DatasetBuilder:
  builder = make()
  version_dir = builder.data_dir
  stamp = os.path.join(os.path.dirname(version_dir), _STAMP)
  ready = os.path.exists(os.path.join(version_dir, "dataset_info.json"))
  if not (ready and _read_stamp(stamp) == build_id):
    logging.info("Materialising TFDS dataset %s in %s.", tfds_name(distribution), version_dir)
    shutil.rmtree(version_dir, ignore_errors=True)
    builder = make()
    progress_bar = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare(download_config=_download_config())
    finally:
      tfds.display_progress_bar(progress_bar)
    with open(stamp + ".tmp", "w", encoding="utf-8") as f:
      f.write(build_id)
    os.replace(stamp + ".tmp", stamp)
    builder = make()
  return builder


class _LocalTextLoader(seqio.utils.LazyTfdsLoader):
  """LazyTfdsLoader whose builder comes from `materialize` under the data dir resolved at use."""

  def __init__(self, distribution: str, data_dir: str | None = None):
    super().__init__(name=tfds_name(distribution), read_only=True)
    self._distribution = distribution
    self._explicit_data_dir = data_dir

  @property
  def data_dir(self) -> str:
    return data_dir_lib.tfds_dir(self._explicit_data_dir)

  def _get_builder(self, split: str | None = None) -> tfds.core.DatasetBuilder:
    del split
    return materialize(self._distribution, self._explicit_data_dir)

  def is_memoized(self, split: str | None = None) -> bool:
    del split
    return False


class LocalTextTfdsSource(seqio.TfdsDataSource):
  """`seqio.TfdsDataSource` over a prepared (or user-registered) distribution.

  Args:
    distribution: distribution name (`wiki_en`, ...).
    data_dir: fixed data dir; None resolves it (flag / gin / env / ./data) each time a dataset is built.
  """

  def __init__(self, distribution: str, data_dir: str | None = None):
    super().__init__(tfds_name=tfds_name(distribution), splits=shards.SPLITS, read_only=True)
    self._loader = _LocalTextLoader(distribution, data_dir)
    self.distribution = distribution

  @property
  def tfds_dataset(self) -> seqio.utils.LazyTfdsLoader:
    return self._loader

  def __str__(self) -> str:
    return f"LocalTextTfdsSource({self.distribution})"
