"""Register-your-own distributions (Python and gin) end to end through TFDS and seqio."""

import itertools
import json
import os
import shutil

import gin
import numpy as np
import pytest
import seqio

import tasks
from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import tfds_builder


@pytest.fixture
def corpus(tmp_path, prepared_data_dir):
  """A folder of .txt (blank-line separated) and .jsonl files, and a data dir holding the vocabulary."""
  folder = tmp_path / "notes"
  (folder / "sub").mkdir(parents=True)
  paragraphs = [
    f"Note {i}: the quick brown fox number {i} jumps.\nSecond line {i}." for i in range(40)
  ]
  (folder / "a.txt").write_text("\n\n".join(paragraphs) + "\n")
  with open(folder / "sub" / "b.jsonl", "w") as f:
    for i in range(20):
      f.write(json.dumps({"text": f"Record {i} says hello to record {i + 1}.", "id": i}) + "\n")
  (folder / "ignored.md").write_text("not a corpus file")
  data = tmp_path / "data"
  shutil.copytree(os.path.join(prepared_data_dir, "vocab"), data / "vocab")
  return str(folder), str(data)


def _documents(data_dir, name, split):
  dist = os.path.join(data_dir, name)
  return [t for _, _, t in shards.iter_documents(shards.split_files(dist, split))]


def _first_batch(name, data_dir, split="train", length=32):
  ds = pipeline.get_dataset(
    name, {"targets": length}, split, 2, shuffle=False, seed=0, repeat=False, data_dir=data_dir
  )
  return next(ds.as_numpy_iterator())


def test_register_from_python_end_to_end(corpus):
  folder, data_dir = corpus
  task = tasks.register_text_distribution("notes", folder=folder, validation_fraction=0.2)
  assert task.name == "lifelong_notes"
  assert tasks.register_text_distribution("notes", folder=folder, validation_fraction=0.2) is task
  batch = _first_batch("lifelong_notes", data_dir, length=96)
  assert batch["decoder_target_tokens"].shape == (2, 96)
  assert batch["decoder_segment_ids"].max() > 1  # short documents are packed several per row
  assert (
    _first_batch("lifelong_notes", data_dir, split="validation")["decoder_loss_weights"].sum() > 0
  )
  train, validation = (
    _documents(data_dir, "notes", "train"),
    _documents(data_dir, "notes", "validation"),
  )
  assert len(train) + len(validation) == 60 and validation and not set(train) & set(validation)
  assert any(d.startswith("Record") for d in train + validation)
  with data_dir_lib.using_data_dir(data_dir):
    text = tasks.corpora.VOCABULARY.decode(batch["decoder_target_tokens"][0].tolist())
  assert "Note" in text or "Record" in text
  assert os.path.exists(os.path.join(data_dir, "tfds", "lifelong_text", "notes", "1.0.0"))

  # Editing a file rebuilds the distribution (and its TFDS view) on next use.
  with open(os.path.join(folder, "a.txt"), "a") as f:
    f.write("\nA brand new note appended later.\n")
  _first_batch("lifelong_notes", data_dir)
  assert (
    len(_documents(data_dir, "notes", "train") + _documents(data_dir, "notes", "validation")) == 61
  )


def test_register_lines_mode_and_mixture(corpus):
  folder, data_dir = corpus
  tasks.register_text_distribution(
    "note_lines", files=[os.path.join(folder, "a.txt")], txt_mode="lines", validation_fraction=0.25
  )
  tasks.register_text_distribution("note_json", files=[os.path.join(folder, "sub", "b.jsonl")])
  mixture = tasks.register_mixture("notes_mix", ["note_lines", "lifelong_note_json"])
  assert _first_batch(mixture.name, data_dir)["decoder_target_tokens"].shape == (2, 32)
  assert (
    len(
      _documents(data_dir, "note_lines", "train") + _documents(data_dir, "note_lines", "validation")
    )
    == 80
  )  # two lines per paragraph


def test_register_from_gin_only(corpus):
  folder, data_dir = corpus
  try:
    gin.parse_config(
      [
        f'register_folder_distributions.folders = {{"gin_notes": "{folder}"}}',
        "register_folder_distributions.validation_fraction = 0.2",
        'register_folder_distributions.mixtures = {"gin_mix": ["gin_notes", "wiki_en"]}',
        f'configured_data_dir.data_dir = "{data_dir}"',
      ]
    )
    batch = _first_batch("lifelong_gin_notes", data_dir=None)  # data dir from gin as well
    assert batch["decoder_target_tokens"].shape == (2, 32)
    assert "lifelong_gin_notes" in [t.name for t in seqio.get_mixture_or_task("gin_mix").tasks]
    assert data_dir_lib.resolve_data_dir() == os.path.abspath(data_dir)
  finally:
    gin.clear_config()
  assert data_dir_lib.resolve_data_dir(data_dir) == os.path.abspath(data_dir)


def test_bad_user_corpora_name_the_file(corpus, tmp_path):
  folder, data_dir = corpus
  empty = os.path.join(folder, "empty.txt")
  open(empty, "w").close()
  tasks.register_text_distribution("with_empty", folder=folder)
  with pytest.raises(ValueError, match=f"{empty}.*no document"):
    _first_batch("lifelong_with_empty", data_dir)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  tasks.register_text_distribution("bad_jsonl", files=[str(bad)])
  with pytest.raises(ValueError, match=f"{bad}:2"):
    _first_batch("lifelong_bad_jsonl", data_dir)
  with pytest.raises(FileNotFoundError, match="missing_folder"):
    tasks.register_text_distribution("nothing", folder=str(tmp_path / "missing_folder"))
  (tmp_path / "no_text").mkdir()
  with pytest.raises(ValueError, match="no_text.*no .txt or .jsonl"):
    tasks.register_text_distribution("nothing", folder=str(tmp_path / "no_text"))
  with pytest.raises(ValueError, match="built-in"):
    tasks.register_text_distribution("wiki_en", folder=folder)
  with pytest.raises(ValueError, match="must match"):
    tasks.register_text_distribution("Bad Name", folder=folder)


def test_missing_split_names_the_file(corpus):
  folder, data_dir = corpus
  tasks.register_text_distribution("split_check", folder=folder, validation_fraction=0.2)
  _first_batch("lifelong_split_check", data_dir)
  dist = os.path.join(data_dir, "split_check")
  shard = os.path.join(dist, "validation-00000-of-00001.jsonl")
  os.remove(shard)
  with pytest.raises(shards.IncompleteBuildError, match=shard):
    shards.verify_distribution(dist)
  # Loaders notice and rebuild user distributions from their files.
  _first_batch("lifelong_split_check", data_dir, split="validation")
  assert os.path.exists(shard)


def test_tfds_name_path_serves_materialised_datasets(prepared_data_dir):
  """The same TfdsDataSource path a cluster uses for C4/wiki40b, here over a local TFDS dir."""
  task = tasks.register_tfds_distribution(
    "wiki_tfds",
    tfds_builder.tfds_name("wiki_en"),
    tfds_data_dir=os.path.join(prepared_data_dir, "tfds"),
  )
  assert type(task.source) is seqio.TfdsDataSource  # pylint: disable=unidiomatic-typecheck
  batches = list(
    itertools.islice(
      pipeline.get_dataset(
        "lifelong_wiki_tfds",
        {"targets": 16},
        "validation",
        2,
        shuffle=False,
        seed=0,
        repeat=False,
        data_dir=prepared_data_dir,
      ).as_numpy_iterator(),
      2,
    )
  )
  reference = list(
    itertools.islice(
      pipeline.get_dataset(
        "lifelong_wiki_en",
        {"targets": 16},
        "validation",
        2,
        shuffle=False,
        seed=0,
        repeat=False,
        data_dir=prepared_data_dir,
      ).as_numpy_iterator(),
      2,
    )
  )
  for a, b in zip(batches, reference):
    np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
