"""The seqio tasks over the prepared corpora, read through TFDS, packed by the pipeline."""

import collections
import hashlib
import itertools
import math
import os

import gin
import numpy as np
import pytest
import sentencepiece
import seqio

import tasks
from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import vocab

DEFAULT_TASKS = [tasks.task_name(d) for d in distributions.DEFAULT_DISTRIBUTIONS]
PACKED_KEYS = {
  "decoder_target_tokens",
  "decoder_input_tokens",
  "decoder_loss_weights",
  "decoder_segment_ids",
  "decoder_positions",
}


def _batches(name, data_dir, n=3, **kwargs):
  args = dict(shuffle=True, seed=0, repeat=True, pack=True)
  args.update(kwargs)
  length = args.pop("length", 64)
  batch_size = args.pop("batch_size", 4)
  split = args.pop("split", "train")
  ds = pipeline.get_dataset(name, {"targets": length}, split, batch_size, data_dir=data_dir, **args)
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def _check_packed_batch(batch, batch_size, length, vocab_size):
  assert set(batch) == PACKED_KEYS
  for value in batch.values():
    assert value.dtype == np.int32 and value.shape == (batch_size, length)
  seg, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
  targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  np.testing.assert_array_equal(batch["decoder_loss_weights"], (targets > 0).astype(np.int32))
  assert targets.max() < vocab_size
  for row in range(batch_size):
    s = seg[row]
    assert s[0] == 1 and np.all(np.diff(s[s > 0]) >= 0)  # segments numbered 1, 2, ... then padding
    assert np.all(s[s == 0] == 0) and np.all(targets[row][s == 0] == 0)
    for segment in np.unique(s[s > 0]):
      idx = np.flatnonzero(s == segment)
      np.testing.assert_array_equal(pos[row][idx], np.arange(len(idx)))  # positions restart
      assert inputs[row][idx[0]] == 0  # BOS(=pad) starts each packed document
      np.testing.assert_array_equal(inputs[row][idx[1:]], targets[row][idx[:-1]])


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_task_loads_packed_through_seqio(prepared_data_dir, name):
  batches = _batches(name, prepared_data_dir, n=6)
  for batch in batches:
    _check_packed_batch(batch, 4, 64, vocab.DEFAULT_VOCAB_SIZE)
  eos_count = sum(int((b["decoder_target_tokens"] == 1).sum()) for b in batches)
  assert eos_count > 0
  task = seqio.get_mixture_or_task(name)
  assert isinstance(task.source, seqio.TfdsDataSource)


def test_mixture_validation_unpacked_and_determinism(prepared_data_dir):
  first = _batches("lifelong_all", prepared_data_dir, n=3, seed=7)
  again = _batches("lifelong_all", prepared_data_dir, n=3, seed=7)
  other = _batches("lifelong_all", prepared_data_dir, n=3, seed=8)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(
    not np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
    for a, b in zip(first, other)
  )
  shard0 = _batches("lifelong_all", prepared_data_dir, n=1, seed=7, shard_index=0, num_shards=2)[0]
  shard1 = _batches("lifelong_all", prepared_data_dir, n=1, seed=7, shard_index=1, num_shards=2)[0]
  assert not np.array_equal(shard0["decoder_target_tokens"], shard1["decoder_target_tokens"])
  unpacked = _batches(
    "lifelong_code_py",
    prepared_data_dir,
    n=1,
    split="validation",
    shuffle=False,
    seed=None,
    repeat=False,
    pack=False,
    batch_size=2,
    length=32,
  )[0]
  assert set(unpacked) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"}
  assert unpacked["decoder_target_tokens"].shape == (2, 32)
  assert len(seqio.get_mixture_or_task("lifelong_all").tasks) == 3
  assert (
    seqio.get_mixture_or_task("lifelong_all_by_size").get_rate(
      seqio.get_mixture_or_task("lifelong_wiki_en")
    )
    > 1.0
  )


@pytest.mark.parametrize("name", distributions.DEFAULT_DISTRIBUTIONS)
def test_train_and_validation_share_no_document(prepared_data_dir, name):
  source = seqio.get_mixture_or_task(tasks.task_name(name)).source
  hashes = {}
  with data_dir_lib.using_data_dir(prepared_data_dir):
    for split in ("train", "validation"):
      ds = source.get_dataset(split=split, shuffle=False)
      hashes[split] = [hashlib.sha256(ex["text"]).hexdigest() for ex in ds.as_numpy_iterator()]
  marker = shards.read_marker(os.path.join(prepared_data_dir, name))
  for split, digests in hashes.items():
    assert len(digests) == marker["splits"][split]["num_documents"]
    assert len(set(digests)) == len(digests)  # exact duplicates were removed at prepare time
  assert not set(hashes["train"]) & set(hashes["validation"])


def _js_bits(a: collections.Counter, b: collections.Counter) -> float:
  ta, tb = sum(a.values()), sum(b.values())
  total = 0.0
  for token in set(a) | set(b):
    p, q = a[token] / ta, b[token] / tb
    m = (p + q) / 2
    total += 0.5 * (p * math.log2(p / m) if p else 0.0) + 0.5 * (q * math.log2(q / m) if q else 0.0)
  return total


def test_distributions_are_measurably_different(prepared_data_dir):
  """Jensen-Shannon divergence (bits, in [0, 1]) of token unigram distributions.

  Reference point: two interleaved halves of the *same* distribution (about 1 MB of text sampled
  evenly, ~150k tokens per half) differ only by sampling noise and topic variation; we measured
  0.02-0.05 bits. Two different distributions measured 0.28 (wiki vs dialog) to 0.52 (code vs
  dialog). We require every cross-distribution JS to exceed 0.2 bits and 4x the largest
  within-distribution JS, so a mix-up of sources (or a vocabulary that maps everything to bytes) fails.
  """
  sp = sentencepiece.SentencePieceProcessor(model_file=vocab.model_path(prepared_data_dir))
  halves = {}
  for name in distributions.DEFAULT_DISTRIBUTIONS:
    dist_dir = os.path.join(prepared_data_dir, name)
    docs = [t for _, _, t in shards.iter_documents(shards.split_files(dist_dir, "train"))]
    stride = max(1, sum(len(d) for d in docs) // 1_000_000)
    sample = docs[::stride]
    halves[name] = [
      collections.Counter(itertools.chain.from_iterable(sp.encode(part)))
      for part in (sample[0::2], sample[1::2])
    ]
  within = {n: _js_bits(*h) for n, h in halves.items()}
  cross = {
    (a, b): _js_bits(halves[a][0], halves[b][0]) for a, b in itertools.combinations(halves, 2)
  }
  print("JS within:", within, "JS across:", cross)
  assert max(within.values()) < 0.1
  for pair, value in cross.items():
    assert value > 0.2 and value > 4 * max(within.values()), (pair, value, within)


def test_unknown_task_and_split_errors(prepared_data_dir):
  with pytest.raises(ValueError) as info:
    pipeline.validate_task_name("lifelong_wikipedia")
  message = str(info.value)
  for name in DEFAULT_TASKS + ["lifelong_all"]:
    assert name in message
  assert "--tasks_module" in message  # says which module registers tasks
  with pytest.raises(ValueError, match="lifelong_wiki_en"):
    pipeline.get_dataset(
      "nope",
      {"targets": 8},
      "train",
      1,
      shuffle=False,
      seed=0,
      repeat=False,
      data_dir=prepared_data_dir,
    )
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.get_dataset(
      "lifelong_wiki_en",
      {"targets": 8},
      "test",
      1,
      shuffle=False,
      seed=0,
      repeat=False,
      data_dir=prepared_data_dir,
    )


def test_unprepared_data_dir_names_prepare_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"lifelong_moe_jax\.data\.prepare --data_dir"):
    pipeline.get_dataset(
      "lifelong_wiki_en",
      {"targets": 8},
      "train",
      1,
      shuffle=False,
      seed=0,
      repeat=False,
      data_dir=str(tmp_path),
    )


def test_byte_vocabulary_selected_by_gin_and_fingerprints(prepared_data_dir):
  with data_dir_lib.using_data_dir(prepared_data_dir):
    spm_print = vocab.vocabulary_fingerprint(tasks.corpora.VOCABULARY)
  assert spm_print.startswith("sentencepiece:sha256=")
  try:
    gin.parse_config("get_vocabulary.kind = 'byte'")
    batch = _batches("lifelong_dialog_en", prepared_data_dir, n=1, length=32)[0]
    assert batch["decoder_target_tokens"].max() < 259  # byte vocabulary: 3 specials + 256 bytes
    assert vocab.vocabulary_fingerprint(tasks.corpora.VOCABULARY) == "byte:extra_ids=0"
    with pytest.raises(ValueError, match="Vocabulary mismatch"):
      vocab.check_vocabulary_fingerprint(
        spm_print, vocab.vocabulary_fingerprint(tasks.corpora.VOCABULARY)
      )
  finally:
    gin.clear_config()
  vocab.check_vocabulary_fingerprint(
    spm_print, vocab.vocabulary_fingerprint(vocab.get_vocabulary(data_dir=prepared_data_dir))
  )


def test_library_registration_functions_are_re_exported():
  from lifelong_moe_jax.data import registration  # pylint: disable=import-outside-toplevel

  for name in (
    "register_text_distribution",
    "register_tfds_distribution",
    "register_mixture",
    "task_name",
  ):
    assert getattr(tasks, name) is getattr(registration, name)
    assert getattr(tasks.corpora, name) is getattr(registration, name)
  assert tasks.corpora.VOCABULARY is vocab.shared_vocabulary()
  assert tasks.corpora.OUTPUT_FEATURES["targets"].vocabulary is vocab.shared_vocabulary()


def test_registration_is_idempotent():
  import importlib  # pylint: disable=import-outside-toplevel

  before = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  tasks.corpora.register_builtin_tasks()
  importlib.import_module("tasks")
  after = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  assert before == after
  assert {"lifelong_all", "lifelong_all_by_size", "lifelong_fortunes_intl"} <= after


def test_data_dir_resolution_order(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(data_dir_lib.DATA_DIR_ENV, raising=False)
  assert data_dir_lib.resolve_data_dir() == str(tmp_path / "data")
  monkeypatch.setenv(data_dir_lib.DATA_DIR_ENV, str(tmp_path / "env"))
  assert data_dir_lib.resolve_data_dir() == str(tmp_path / "env")
  try:
    gin.parse_config(f"configured_data_dir.data_dir = '{tmp_path / 'gin'}'")
    assert data_dir_lib.resolve_data_dir() == str(tmp_path / "gin")
    with data_dir_lib.using_data_dir(str(tmp_path / "flag")):
      assert data_dir_lib.resolve_data_dir() == str(tmp_path / "flag")
      assert data_dir_lib.resolve_data_dir("explicit") == str(tmp_path / "explicit")
    assert data_dir_lib.resolve_data_dir() == str(tmp_path / "gin")
  finally:
    gin.clear_config()
