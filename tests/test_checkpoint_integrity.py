"""Checkpoint integrity (issue 10): manifests, verification and the fallback past damaged steps.

Acceptance: an uninterrupted tiny run (models/tiny.gin, 8 steps, synchronous checkpoints every 2
steps) is the reference. For each damage kind applied to the latest step (8) of a copy of its
folder, training the copy to step 8 again resumes from step 6, moves step 8 aside with one warning
naming it, and ends bit-identical to the reference (params and optimizer state).

The other tests are in-process and cheap: steps without a manifest, checksum-only damage, the
none-intact error, read-only resolution and asynchronous saves.
"""

import dataclasses
import json
import logging
import os
import shutil

import gin
import jax
import numpy as np
import pytest

from lifelong_moe_jax import checkpoint_manifest as cm
from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import trainer as trainer_lib
import tasks  # noqa: F401  (registers the seqio tasks)

FINGERPRINT = "byte:extra_ids=0"


def _tiny_config() -> ModelConfig:
  gin.clear_config()
  try:
    gin_utils.parse_gin(["models/tiny.gin"], [], finalize=False)
    return ModelConfig()
  finally:
    gin.clear_config()


def _optimizer() -> optimizers.Optimizer:
  return optimizers.create_optimizer(
    "adafactor", optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0)
  )


def _train_kwargs(data_dir: str) -> dict:
  return dict(
    mixture_or_task_name="lifelong_dialog_en",
    task_feature_lengths={"targets": 32},
    batch_size=8,
    model_config=_tiny_config(),
    mesh_config=pt.MeshConfig(2, 4, 1),
    data_dir=data_dir,
    optimizer=_optimizer(),
    checkpoint_config=checkpoints.CheckpointConfig(
      save_interval_steps=2, max_to_keep=None, async_checkpointing=False
    ),
  )


def _files_by_size(step_dir, prefix: str = "") -> list[str]:
  names = [n for n in cm.list_files(step_dir) if n.startswith(prefix)]
  return sorted(names, key=lambda n: (-os.path.getsize(os.path.join(step_dir, n)), n))


# ------------------------------------------------------------------------------ damage kinds
def truncate_array_file(step_dir: str) -> None:
  path = os.path.join(step_dir, _files_by_size(step_dir, "state/")[0])  # the largest: array data
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def remove_state_metadata(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def remove_metadata_file(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "metadata", "metadata"))


def partial_step_folder(step_dir: str) -> None:
  """As left by an interrupted copy: the second half of the files (in copy order) is missing."""
  names = sorted(cm.list_files(step_dir) + [cm.MANIFEST_NAME])
  for name in names[len(names) // 2 :]:
    os.remove(os.path.join(step_dir, name))


def partial_step_folder_without_manifest(step_dir: str) -> None:
  """Half of the array files gone, and no manifest to tell: only reading the step finds out."""
  os.remove(os.path.join(step_dir, cm.MANIFEST_NAME))
  for name in _files_by_size(step_dir, "state/")[::2]:
    os.remove(os.path.join(step_dir, name))


DAMAGES = {
  f.__name__: f
  for f in (
    truncate_array_file,
    remove_state_metadata,
    remove_metadata_file,
    partial_step_folder,
    partial_step_folder_without_manifest,
  )
}


# ------------------------------------------------------------------------------ acceptance
@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """Every run here compiles the same train step: a persistent cache (this module only) compiles
  it once."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top

  saved = {
    name: getattr(jax.config, name)
    for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  }
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(scope="module")
def reference(prepared_data_dir, tmp_path_factory, compilation_cache):
  del compilation_cache
  from lifelong_moe_jax import train  # pylint: disable=import-outside-toplevel

  model_dir = str(tmp_path_factory.mktemp("integrity") / "reference")
  result = train.train(model_dir=model_dir, train_steps=8, **_train_kwargs(prepared_data_dir))
  return model_dir, jax.device_get(result.state), result


def _assert_identical(state, expected) -> None:
  got = jax.device_get(state)
  assert int(got.step) == int(expected.step)
  for name in ("params", "opt_state"):
    jax.tree_util.tree_map(
      np.testing.assert_array_equal, getattr(got, name), getattr(expected, name)
    )


def test_every_saved_step_has_a_matching_manifest(reference):
  model_dir, _, _ = reference
  root = checkpoints.checkpoints_dir(model_dir)
  assert sorted(os.listdir(root)) == ["2", "4", "6", "8"]
  for step in (2, 4, 6, 8):
    step_dir = os.path.join(root, str(step))
    manifest = cm.read_manifest(step_dir)
    assert manifest["step"] == step and manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == cm.list_files(step_dir)
    assert {"state/_METADATA", "metadata/metadata", "_CHECKPOINT_METADATA"} <= set(
      manifest["files"]
    )
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"].values())
    assert cm.verify_step(step_dir).status == cm.INTACT


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_step_resumes_from_previous_and_ends_identical(
  reference, prepared_data_dir, tmp_path, caplog, damage
):
  from lifelong_moe_jax import train  # pylint: disable=import-outside-toplevel

  reference_dir, expected, _ = reference
  model_dir = str(tmp_path / "run")
  shutil.copytree(reference_dir, model_dir)
  root = checkpoints.checkpoints_dir(model_dir)
  DAMAGES[damage](os.path.join(root, "8"))
  with caplog.at_level(logging.WARNING):
    result = train.train(model_dir=model_dir, train_steps=8, **_train_kwargs(prepared_data_dir))
  assert (result.start_source, result.start_step) == ("resumed", 6)
  warnings = [
    r.getMessage()
    for r in caplog.records
    if r.levelno >= logging.WARNING and "damaged" in r.getMessage()
  ]
  assert len(warnings) == 1 and "Checkpoint step 8 (" in warnings[0], warnings
  assert "\n" not in warnings[0]
  assert sorted(os.listdir(root)) == ["2", "4", "6", "8", "8.damaged-1"]  # moved, not deleted
  _assert_identical(result.state, expected)
  assert cm.verify_step(os.path.join(root, "8")).status == cm.INTACT  # saved again, verified


# ------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def small(reference):
  """The reference run's trainer and final (sharded) state, saved below as steps 2 and 4."""
  result = reference[2]
  return result.trainer, result.state


def _save(model_dir: str, state, steps=(2, 4), async_checkpointing: bool = False) -> str:
  ckpt = checkpoint_manager.Checkpointer(
    model_dir,
    checkpoints.CheckpointConfig(
      save_interval_steps=1, max_to_keep=None, async_checkpointing=async_checkpointing
    ),
  )
  for step in steps:
    ckpt.save(step, state, {"vocabulary_fingerprint": FINGERPRINT})
  ckpt.close()
  return ckpt.directory


def _resume(trainer, model_dir: str) -> trainer_lib.StartPoint:
  return trainer.restore_or_initialize(
    checkpoint_manager.Checkpointer(model_dir), vocabulary_fingerprint=FINGERPRINT
  )


def test_async_saves_get_manifests_once_final(small, tmp_path):
  trainer, state = small
  root = _save(str(tmp_path), state, steps=(2, 4, 6), async_checkpointing=True)
  for step in (2, 4, 6):
    assert cm.verify_step(os.path.join(root, str(step))).status == cm.INTACT
  assert _resume(trainer, str(tmp_path)).step_dir.endswith("/6")


def test_step_without_manifest_is_unverified_not_damaged(small, tmp_path):
  """A crash between orbax's finalize and the manifest write leaves a readable step: it is used."""
  trainer, state = small
  root = _save(str(tmp_path), state)
  os.remove(os.path.join(root, "4", cm.MANIFEST_NAME))
  assert cm.verify_step(os.path.join(root, "4")).status == cm.UNVERIFIED
  start = _resume(trainer, str(tmp_path))
  assert start.step_dir == os.path.join(root, "4") and sorted(os.listdir(root)) == ["2", "4"]
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(start.state.params), jax.device_get(state.params)
  )


def test_checksum_damage_is_found_by_full_verification_only(small, tmp_path, caplog):
  """Same size, one flipped byte: sizes pass, the checksum does not; the trainer falls back."""
  trainer, state = small
  root = _save(str(tmp_path), state)
  step_dir = os.path.join(root, "4")
  name = _files_by_size(step_dir, "state/")[0]
  with open(os.path.join(step_dir, name), "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  assert cm.verify_step(step_dir, level="sizes").status == cm.INTACT
  assert cm.verify_step(step_dir).problem == f"{name}: sha256 differs from the manifest"
  with caplog.at_level(logging.WARNING):
    start = _resume(trainer, str(tmp_path))
  assert start.step_dir == os.path.join(root, "2")
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert warnings == [
    f"Checkpoint step 4 ({name}: sha256 differs from the manifest) is damaged; "
    f"moved aside to {step_dir}.damaged-1; using the newest intact step 2 "
    "instead."
  ]


def test_no_intact_step_is_one_line_error_and_moves_nothing(small, tmp_path):
  trainer, state = small
  root = _save(str(tmp_path), state)
  remove_state_metadata(os.path.join(root, "4"))
  remove_metadata_file(os.path.join(root, "2"))
  with pytest.raises(checkpoints.CheckpointDamagedError) as err:
    _resume(trainer, str(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(
    f"Checkpoint step 4 in {root} is damaged (state/_METADATA: missing); "
    "older steps are damaged too: 2 (metadata/metadata: missing). Nothing "
    "was moved."
  ), message
  assert sorted(os.listdir(root)) == ["2", "4"]


def test_configuration_errors_are_not_damage(small, tmp_path):
  """A vocabulary or shape mismatch stops the run as before: nothing is moved aside."""
  trainer, state = small
  root = _save(str(tmp_path), state)
  with pytest.raises(ValueError, match="Vocabulary mismatch"):
    trainer.restore_or_initialize(
      checkpoint_manager.Checkpointer(str(tmp_path)),
      vocabulary_fingerprint="sentencepiece:sha256=abc:extra_ids=0",
    )
  other = trainer_lib.Trainer(
    lm.LanguageModel(dataclasses.replace(trainer.model.config, num_experts=4)),
    trainer.partitioner,
    _optimizer(),
  )
  with pytest.raises(checkpoints.CheckpointMismatchError):
    _resume(other, str(tmp_path))
  assert sorted(os.listdir(root)) == ["2", "4"]


def test_read_only_resolution_skips_damaged_steps_without_moving(small, tmp_path, caplog):
  _, state = small
  root = _save(str(tmp_path), state)
  truncate_array_file(os.path.join(root, "4"))
  with caplog.at_level(logging.WARNING):
    assert checkpoints.resolve_step_dir(str(tmp_path)) == os.path.join(root, "2")
    assert checkpoints.read_metadata(str(tmp_path))["step"] == 2
  assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
  with pytest.raises(
    checkpoints.CheckpointDamagedError,
    match=r"^Checkpoint step 4 in .* is "
    r"damaged \(state/.*: \d+ bytes, manifest says \d+\); use another step",
  ):
    checkpoints.resolve_step_dir(str(tmp_path), step=4)
  assert sorted(os.listdir(root)) == ["2", "4"]


def test_reading_a_damaged_step_dir_is_one_line(small, tmp_path):
  trainer, state = small
  root = _save(str(tmp_path), state)
  step_dir = os.path.join(root, "4")
  os.remove(os.path.join(step_dir, cm.MANIFEST_NAME))
  # Every array data file: OCDBT packs arrays into files in no fixed order, so the largest file
  # alone may hold only optimizer state, which a params-only restore never reads.
  for name in _files_by_size(step_dir, "state/"):
    if "/d/" in name:
      with open(os.path.join(step_dir, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(step_dir, name)) // 2)
  with pytest.raises(checkpoints.CheckpointReadError) as err:
    checkpoints.restore_params(step_dir, trainer.abstract_state.params)
  assert "\n" not in str(err.value) and str(err.value).startswith(
    f"Cannot read checkpoint {step_dir} (reading state "
  ), str(err.value)


def test_move_aside_never_overwrites(tmp_path):
  for n in (1, 2):
    os.makedirs(tmp_path / "6")
    assert cm.move_aside(str(tmp_path / "6")) == str(tmp_path / f"6.damaged-{n}")
  assert cm.damaged_folders(str(tmp_path)) == ["6.damaged-1", "6.damaged-2"]
  with pytest.raises(ValueError, match="not valid JSON"):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / cm.MANIFEST_NAME).write_text("{")
    cm.read_manifest(str(tmp_path / "7"))
  assert cm.verify_step(str(tmp_path / "7")).status == cm.DAMAGED
  assert json.loads(json.dumps(cm.build_manifest(str(tmp_path / "6.damaged-1"), 6)))["files"] == {}
