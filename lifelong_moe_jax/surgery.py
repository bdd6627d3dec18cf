r"""Expert-expansion surgery on a saved checkpoint (CLI).

    python -m lifelong_moe_jax.surgery --checkpoint=/runs/a/checkpoints/1000 --output=/runs/a_e8 \
        --add_experts=4 --init=copy [--noise_scale=0.01] [--phase_name=NAME] [--seed=0] \
        [--gin_file=...] [--gin.MeshConfig.expert=4]

Reads the checkpoint (a step folder, or a MODEL_DIR / checkpoints folder: its latest step) with its
metadata, grows every MoE layer from E to E + N experts (params, router columns, optimizer state;
``lifelong.phase_expansion.expand_for_phase``), validates the result (shapes, old slices
bit-equal), appends a phase to the phase record saved in the metadata and writes
``OUTPUT/checkpoints/<step>`` — a run folder that ``train`` resumes from (``--gin.MODEL_DIR`` =
OUTPUT with the expanded model config) or restores with ``train.restore_checkpoint_path``. The data
position is not carried over: a run that resumes from OUTPUT starts its input stream afresh.

Sharding: arrays are restored directly into the shardings of the mesh given by ``--gin_file`` /
``--gin.MeshConfig.*`` flags (default: every local device on the data axis, whatever mesh the run
was trained on), expanded on device and written shard by shard; the checkpoint may have been saved
from any other number of devices. The optimizer's settings are read from the run's ``config.gin``
(``MODEL_DIR/config.gin`` next to the checkpoints, when present; only ``create_optimizer`` and
``learning_rate_schedule`` bindings are taken from it), then from the flags; its name comes from the
checkpoint metadata. The sequence itself is ``lifelong.checkpoint_expansion.expand_checkpoint``, the
same one every lifelong phase start runs.

Idempotent: the output is written to ``OUTPUT.tmp`` and renamed when complete. Running the same
command again finds the finished OUTPUT and does nothing; running it on a checkpoint whose phase
record already holds ``--phase_name`` (e.g. its own output) is refused (``AlreadyExpandedError``),
so experts are never added twice by accident. Chain expansions with distinct ``--phase_name``s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import flags
from absl import logging
import gin
import jax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import cli_errors
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import checkpoint_expansion
from lifelong_moe_jax.lifelong import phase_expansion
from lifelong_moe_jax.lifelong.phase_record import METADATA_KEY
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers

flags.DEFINE_string("checkpoint", None, "Checkpoint step folder, or a MODEL_DIR (latest step).")
flags.DEFINE_string("output", None, "Output run folder (OUTPUT/checkpoints/<step> is written).")
flags.DEFINE_integer("add_experts", None, "Experts N added to every MoE layer.")
flags.DEFINE_enum(
  "init",
  "copy",
  ["copy", "random"],
  "New experts: copies of existing experts "
  "(round-robin) plus noise, or the layer's own random initializer.",
)
flags.DEFINE_float("noise_scale", 0.01, "copy: noise std relative to the std of the copied slice.")
flags.DEFINE_string(
  "phase_name",
  None,
  "Phase name recorded for the new experts (default: "
  "expand_at_step_<step>). A checkpoint already expanded for it is refused.",
)
flags.DEFINE_integer("seed", 0, "Seed of the copy noise / random init.")


class SurgeryCliError(cli_errors.UsageError):
  """The surgery cannot be run as asked (exit code 2, one ``error:`` line via ``gin_utils.run``)."""


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
    raise SurgeryCliError(
      f"--output {output} exists but holds no readable checkpoint ({e}); "
      "choose another folder or delete it."
    ) from e
  done = (metadata.get(METADATA_KEY) or {}).get("surgery") or {}
  if done.get("phase_name") != phase_name or done.get("source") != source:
    raise SurgeryCliError(
      f"--output {output} already holds a different checkpoint (surgery "
      f"{done or 'none'}); choose another folder."
    )
  record = PhaseRecord.from_dict(metadata[METADATA_KEY]["phase_record"])
  return SurgeryOutcome(
    "already_done", step_dir, record.experts_before(phase_name), record.num_experts, record
  )


def run_surgery(
  checkpoint: str,
  output: str,
  add_experts: int,
  *,
  init: str = "copy",
  noise_scale: float = 0.01,
  phase_name: str | None = None,
  seed: int = 0,
  mesh_config: partitioning.MeshConfig | None = None,
  optimizer: optimizers.Optimizer | None = None,
) -> SurgeryOutcome:
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
    SurgeryCliError / expansion.ExpansionError (phase_expansion.AlreadyExpandedError) /
    CheckpointMismatchError.
  """
  if add_experts is None or add_experts <= 0:
    raise SurgeryCliError(f"--add_experts must be a positive integer, got {add_experts}.")
  step_dir = checkpoints.resolve_step_dir(checkpoint)
  metadata = checkpoints.read_metadata(step_dir)
  if "model_config" not in metadata:
    raise SurgeryCliError(
      f"{step_dir} has no model_config in its metadata; it was not written by "
      "this package's trainer."
    )
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
  record = checkpoint_expansion.record_of_checkpoint(metadata, config)
  if record is not None and phase_name in record:  # refused before anything is restored
    raise phase_expansion.AlreadyExpandedError(
      f"{step_dir} was already expanded for phase {phase_name!r} (phase record: "
      f"{record.expert_slices()}); expanding again would add experts twice. Resume from it, or "
      "pass another --phase_name to add more experts."
    )
  mesh = partitioning.create_mesh(
    mesh_config or partitioning.MeshConfig(data=-1, expert=1, model=1)
  )
  optimizer = optimizer or optimizers.create_optimizer(name=metadata.get("optimizer", "adafactor"))
  logging.info(
    "Restoring %s (%d experts per MoE layer) on mesh %s.",
    step_dir,
    config.num_experts,
    dict(mesh.shape),
  )
  info = {k: v for k, v in (metadata.get(METADATA_KEY) or {}).items() if k != "phase_record"}
  info["surgery"] = {
    "phase_name": phase_name,
    "source": source,
    "add_experts": add_experts,
    "init": init,
    "noise_scale": noise_scale,
    "seed": seed,
  }
  mixture = str((metadata.get("data") or {}).get("mixture_or_task_name", "unknown"))
  result = checkpoint_expansion.expand_checkpoint(
    step_dir,
    output,
    source_config=config,
    partitioner=partitioning.Partitioner(mesh),
    optimizer=optimizer,
    add_experts=add_experts,
    phase_name=phase_name,
    mixture=mixture,
    steps=0,
    method="surgery",
    rng=jax.random.PRNGKey(seed),
    init=init,
    noise_scale=noise_scale,
    lifelong_info=info,
  )
  return SurgeryOutcome(
    "expanded", result.step_dir, result.num_experts_before, result.num_experts_after, result.record
  )


def _parse_gin_for(step_dir: str) -> tuple[bool, str | None]:
  """Parses the run's own config.gin (for the optimizer settings), then the gin flags (which win).

  Returns:
    Whether the flags configure the mesh (else the CLI uses every device on the data axis, not the
    mesh the run was trained on), and the run's config.gin when it was read.
  """
  run_config = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.gin")
  found = os.path.exists(run_config)
  if found:
    gin.parse_config_files_and_bindings([run_config], [], skip_unknown=True, finalize_config=False)
  f = flags.FLAGS
  gin_utils.parse_gin(list(f.gin_file), list(f.gin_bindings), f.gin_search_paths)
  mesh_from_flags = bool(f.gin_file) or any("MeshConfig" in b for b in f.gin_bindings)
  return mesh_from_flags, run_config if found else None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  missing = [name for name in ("checkpoint", "output", "add_experts") if getattr(f, name) is None]
  if missing:
    raise gin_utils.GinConfigError(
      f"Missing required flag(s): {', '.join('--' + m for m in missing)}."
    )
  gin_utils.apply_runtime_flags()
  step_dir = checkpoints.resolve_step_dir(f.checkpoint)
  mesh_from_flags, run_config = _parse_gin_for(step_dir)
  outcome = run_surgery(
    f.checkpoint,
    f.output,
    f.add_experts,
    init=f.init,
    noise_scale=f.noise_scale,
    phase_name=f.phase_name,
    seed=f.seed,
    mesh_config=partitioning.MeshConfig() if mesh_from_flags else None,
  )
  if run_config:  # logged once the surgery is done, so that a refusal prints only its error line
    logging.info("Optimizer settings were read from the run's %s.", run_config)
  if outcome.status == "already_done":
    print(
      f"Nothing to do: {outcome.step_dir} already holds this expansion "
      f"({outcome.num_experts_before} -> {outcome.num_experts_after} experts per MoE layer)."
    )
  else:
    print(
      f"Expanded {outcome.num_experts_before} -> {outcome.num_experts_after} experts per MoE "
      f"layer; wrote {outcome.step_dir}. Phase record: "
      f"{outcome.record.expert_slices()}."
    )


if __name__ == "__main__":
  gin_utils.run(main)
