r"""Expert-expansion surgery on a saved checkpoint (CLI).

    python -m lifelong_moe_jax.surgery --checkpoint=/runs/a/checkpoints/1000 --output=/runs/a_e8 \
        --add_experts=4 --init=copy [--noise_scale=0.01] [--phase_name=NAME] [--seed=0] \
        [--gin_file=...] [--gin.MeshConfig.expert=4]

Reads the checkpoint (a step folder, or a MODEL_DIR / checkpoints folder: its latest step) with its
metadata, grows every MoE layer from E to E + N experts (params, router columns, optimizer state;
``lifelong.surgery.expand_for_phase``), validates the result (shapes, old slices bit-equal), appends a
phase to the phase record saved in the metadata and writes ``OUTPUT/checkpoints/<step>`` — a run
folder that ``train`` resumes from (``--gin.MODEL_DIR`` = OUTPUT with the expanded model config) or
restores with ``train.restore_checkpoint_path``. The data position is not carried over: a run that
resumes from OUTPUT starts its input stream afresh.

Sharding: arrays are restored directly into the shardings of the mesh given by gin ``MeshConfig``
(default: every local device on the data axis), expanded on device and written shard by shard; the
checkpoint may have been saved from any other number of devices. The optimizer is rebuilt from the
run's ``config.gin`` (``MODEL_DIR/config.gin`` next to the checkpoints, when present) unless
``--gin_file`` is given, and its name from the checkpoint metadata.

Idempotent: the output is written to ``OUTPUT.tmp`` and renamed when complete. Running the same
command again finds the finished OUTPUT and does nothing; running it on a checkpoint whose phase
record already holds ``--phase_name`` (e.g. its own output) is refused (``AlreadyExpandedError``),
so experts are never added twice by accident. Chain expansions with distinct ``--phase_name``s.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
import gin
import jax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import surgery as surgery_lib
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import train_state as ts
from lifelong_moe_jax.training import trainer as trainer_lib

flags.DEFINE_string("checkpoint", None, "Checkpoint step folder, or a MODEL_DIR (latest step).")
flags.DEFINE_string("output", None, "Output run folder (OUTPUT/checkpoints/<step> is written).")
flags.DEFINE_integer("add_experts", None, "Experts N added to every MoE layer.")
flags.DEFINE_enum("init", "copy", ["copy", "random"], "New experts: copies of existing experts "
                  "(round-robin) plus noise, or the layer's own random initializer.")
flags.DEFINE_float("noise_scale", 0.01, "copy: noise std relative to the std of the copied slice.")
flags.DEFINE_string("phase_name", None, "Phase name recorded for the new experts (default: "
                    "expand_at_step_<step>). A checkpoint already expanded for it is refused.")
flags.DEFINE_integer("seed", 0, "Seed of the copy noise / random init.")

METADATA_KEY = "lifelong"


class SurgeryCliError(ValueError):
  """The surgery cannot be run as asked."""


@dataclasses.dataclass
class SurgeryOutcome:
  """What ``run_surgery`` did.

  Attributes:
    status: "expanded" or "already_done" (the output existed and holds this expansion).
    step_dir: the output checkpoint step folder.
    num_experts_before / num_experts_after: experts per MoE layer.
    record: the output's phase record.
  """
  status: str
  step_dir: str
  num_experts_before: int
  num_experts_after: int
  record: PhaseRecord


def _record_of(metadata: dict[str, Any], config: ModelConfig, step: int) -> PhaseRecord:
  """The checkpoint's phase record, or a one-phase record describing a plain pretrained model."""
  info = metadata.get(METADATA_KEY) or {}
  if info.get("phase_record"):
    return PhaseRecord.from_dict(info["phase_record"])
  data = metadata.get("data") or {}
  return PhaseRecord.start("pretrain", mixture=str(data.get("mixture_or_task_name", "unknown")),
                           steps=step, method="pretrain", num_experts=config.num_experts)


def _finished_output(output: str, phase_name: str, source: str) -> SurgeryOutcome | None:
  """The outcome of an earlier identical run whose OUTPUT is complete, else None.

  Raises:
    SurgeryCliError: OUTPUT exists but holds something else.
  """
  if not os.path.exists(output):
    return None
  try:
    step_dir = checkpoints.resolve_step_dir(output)
    metadata = checkpoints.read_metadata(step_dir)
  except (checkpoints.CheckpointNotFoundError, OSError, ValueError) as e:
    raise SurgeryCliError(f"--output {output} exists but holds no readable checkpoint ({e}); "
                          "choose another folder or delete it.") from e
  done = (metadata.get(METADATA_KEY) or {}).get("surgery") or {}
  if done.get("phase_name") != phase_name or done.get("source") != source:
    raise SurgeryCliError(f"--output {output} already holds a different checkpoint (surgery "
                          f"{done or 'none'}); choose another folder.")
  record = PhaseRecord.from_dict(metadata[METADATA_KEY]["phase_record"])
  return SurgeryOutcome("already_done", step_dir, record.experts_before(phase_name),
                        record.num_experts, record)


def run_surgery(checkpoint: str, output: str, add_experts: int, *, init: str = "copy",
                noise_scale: float = 0.01, phase_name: str | None = None, seed: int = 0,
                mesh_config: partitioning.MeshConfig | None = None,
                optimizer: optimizers.Optimizer | None = None) -> SurgeryOutcome:
  """Expands a checkpoint (see the module docstring); the Python entry point of the CLI.

  Args:
    checkpoint: step folder or run folder.
    output: new run folder.
    add_experts: N > 0.
    init: "copy" or "random".
    noise_scale: copy noise scale.
    phase_name: recorded phase name (default ``expand_at_step_<step>``).
    seed: rng seed.
    mesh_config: default ``MeshConfig()`` from gin.
    optimizer: the optimizer of the saved state (default ``create_optimizer(name=<metadata>)``
      with gin's other settings).
  Raises:
    SurgeryCliError / surgery.ExpansionError (AlreadyExpandedError) / CheckpointMismatchError.
  """
  if add_experts is None or add_experts <= 0:
    raise SurgeryCliError(f"--add_experts must be a positive integer, got {add_experts}.")
  step_dir = checkpoints.resolve_step_dir(checkpoint)
  metadata = checkpoints.read_metadata(step_dir)
  if "model_config" not in metadata:
    raise SurgeryCliError(f"{step_dir} has no model_config in its metadata; it was not written by "
                          "this package's trainer.")
  config = ModelConfig(**metadata["model_config"])
  if not config.is_moe:
    raise SurgeryCliError(f"{step_dir} holds a dense model (num_experts=0): nothing to expand.")
  step = int(metadata.get("step", 0))
  phase_name = phase_name or f"expand_at_step_{step}"
  source = os.path.abspath(step_dir)
  output = os.path.abspath(output)
  finished = _finished_output(output, phase_name, source)
  if finished is not None:
    return finished
  record = _record_of(metadata, config, step)

  mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
  new_config = surgery_lib.expanded_config(config, add_experts)
  partitioning.validate_model_for_mesh(config, mesh)
  partitioning.validate_model_for_mesh(new_config, mesh)
  partitioner = partitioning.Partitioner(mesh)
  optimizer = optimizer or optimizers.create_optimizer(name=metadata.get("optimizer", "adafactor"))
  model = lm.LanguageModel(config)
  trainer = trainer_lib.Trainer(model, partitioner, optimizer)
  logging.info("Restoring %s (%d experts per MoE layer) on mesh %s.", step_dir, config.num_experts,
               dict(mesh.shape))
  state = checkpoints.restore_tree(step_dir, trainer.abstract_state,
                                   model_config=metadata["model_config"])
  surgery_lib.check_not_already_expanded(record, phase_name, state.params, trainer.params_axes)
  mixture = str((metadata.get("data") or {}).get("mixture_or_task_name", "unknown"))
  result = surgery_lib.expand_for_phase(
      state.params, trainer.params_axes, record, phase_name=phase_name, mixture=mixture, steps=0,
      method="surgery", add_experts=add_experts, init=init, rng=jax.random.PRNGKey(seed),
      noise_scale=noise_scale, model_for_random_init=lm.LanguageModel(new_config),
      opt_state=state.opt_state, tx=optimizer.tx)
  new_state = ts.TrainState(step=state.step, params=result.params, opt_state=result.opt_state,
                            rng=state.rng)
  new_metadata = {k: v for k, v in metadata.items() if k not in ("step", "data", "format_version")}
  new_metadata["model_config"] = dataclasses.asdict(new_config)
  new_metadata[METADATA_KEY] = dict(
      metadata.get(METADATA_KEY) or {}, phase_record=result.record.to_dict(),
      surgery={"phase_name": phase_name, "source": source, "add_experts": add_experts,
               "init": init, "noise_scale": noise_scale, "seed": seed})
  tmp = output + ".tmp"
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)
  checkpoints.save_state(tmp, step, new_state, new_metadata)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    os.replace(tmp, output)
  return SurgeryOutcome("expanded", checkpoints.resolve_step_dir(output), config.num_experts,
                        new_config.num_experts, result.record)


def _parse_gin_for(step_dir: str) -> None:
  """Gin from the flags, else the run's own config.gin (for the optimizer settings)."""
  f = flags.FLAGS
  if f.gin_file or f.gin_bindings:
    gin_utils.parse_from_flags()
    return
  run_config = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.gin")
  if os.path.exists(run_config):
    logging.info("Using the run's optimizer settings from %s.", run_config)
    gin.parse_config_files_and_bindings([run_config], [], skip_unknown=True)
  gin.finalize()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  missing = [name for name in ("checkpoint", "output", "add_experts") if getattr(f, name) is None]
  if missing:
    raise gin_utils.GinConfigError(f"Missing required flag(s): {', '.join('--' + m for m in missing)}.")
  gin_utils.apply_runtime_flags()
  # pylint: disable=import-outside-toplevel,unused-import
  from lifelong_moe_jax import train  # noqa: F401  (registers the run's gin configurables)
  # pylint: enable=import-outside-toplevel,unused-import
  try:
    step_dir = checkpoints.resolve_step_dir(f.checkpoint)
    _parse_gin_for(step_dir)
    outcome = run_surgery(f.checkpoint, f.output, f.add_experts, init=f.init,
                          noise_scale=f.noise_scale, phase_name=f.phase_name, seed=f.seed)
  except (SurgeryCliError, surgery_lib.ExpansionError, checkpoints.CheckpointNotFoundError) as e:
    sys.exit(f"error: {e}")
  if outcome.status == "already_done":
    print(f"Nothing to do: {outcome.step_dir} already holds this expansion "
          f"({outcome.num_experts_before} -> {outcome.num_experts_after} experts per MoE layer).")
  else:
    print(f"Expanded {outcome.num_experts_before} -> {outcome.num_experts_after} experts per MoE "
          f"layer; wrote {outcome.step_dir}. Phase record: "
          f"{outcome.record.expert_slices()}.")


if __name__ == "__main__":
  gin_utils.run(main)
