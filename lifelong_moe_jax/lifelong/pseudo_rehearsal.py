"""Distillation on the teacher's own samples (pseudo-rehearsal; ``MethodOptions.distill_inputs``).

The study (docs/study.md, "Why adaptation lags") found two limits of distillation on the new batch:
the objective ``CE(new) + w KL(teacher || student)`` on the *same* new-data tokens has its optimum at
``(p_data + w p_teacher) / (1 + w)``, so the student cannot adapt further than that mixture; and the
forgetting lives in the shared params, which the KL constrains only on new-data inputs. Distilling on
sequences sampled from the teacher instead puts the constraint where the old knowledge is (inputs
that look like the earlier distributions, as the teacher sees them) and leaves the new-data CE free:
the generative pseudo-rehearsal of Robins (1995) and of LAMOL-style lifelong LMs, with the previous
phase's model as the generator. No old data is used.

When a phase starts, ``save_teacher_samples`` draws sequences from the previous phase's final model
(unconditional: BOS only, ``teacher_sample_temperature``, stop at EOS), packs them into
``teacher_sample_rows`` rows of the train length exactly as seqio's packing
``DecoderFeatureConverter`` lays out train batches (``pack_sequences``) and saves them with the
phase's start (``<phase folder>/teacher_samples.npz``), so a resumed phase rehearses the same rows.
A teacher trained with pseudo-rehearsal itself generates text of every earlier distribution it kept,
so the rehearsal chains over phases; its samples lean to the distribution it was trained on last,
though (the study's phase-C rows were about a third English text after B). With
``teacher_sample_pool = "accumulated"`` a phase's rows are the previous phase's saved rows (drawn
from the models before) followed by the new ones (``pool_rows``), so every earlier generator
contributes ``teacher_sample_rows`` rows; the teacher of the KL is still the previous phase's model.

``TeacherSampleDistillation`` is the regularizer: every step it draws a batch of those rows (as many
as the train batch, or ``teacher_sample_batch``), runs the student (train mode, as on the new batch) and the teacher on it and
adds ``weight * T^2 KL(teacher || student)``; with ``distill_inputs = "both"`` it also keeps the
usual term on the new batch (``distill.Distillation``, whose metrics keep their names). The extra
student forward/backward and teacher forward on the rehearsal rows cost about one more train step
of compute per step.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from lifelong_moe_jax import decoding
from lifelong_moe_jax import distributed
from lifelong_moe_jax.lifelong import distill
from lifelong_moe_jax.lifelong import report_plots
from lifelong_moe_jax.lifelong.method_options import MethodError
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe

if TYPE_CHECKING:
  from lifelong_moe_jax.lifelong.methods import Method, PhaseSetup

Array = jax.Array
PyTree = Any
SAMPLES_FILE = "teacher_samples.npz"
FEATURES = (
  "decoder_target_tokens",
  "decoder_input_tokens",
  "decoder_loss_weights",
  "decoder_segment_ids",
  "decoder_positions",
)
SAMPLE_SEED_OFFSET = 104729
MAX_SAMPLING_ROUNDS = 64


def pack_sequences(
  sequences: Sequence[np.ndarray], num_rows: int, length: int
) -> tuple[dict[str, np.ndarray], int]:
  """Packs token sequences, in order, into ``num_rows`` rows of ``length`` (seqio's packed layout).

  A sequence ``x_1 .. x_n`` (its EOS included, no BOS) takes ``n`` consecutive columns of a row:
  targets ``x_1 .. x_n``, inputs ``0, x_1 .. x_{n-1}`` (shifted right within its segment), loss
  weights 1, segment id ``1, 2, ...`` within the row, positions ``0 .. n-1``; padding is 0 in every
  feature. A sequence that does not fit the rest of the current row starts the next one; sequences
  longer than ``length`` are cut to ``length``; empty ones are skipped.

  Args:
    sequences: int arrays ``[n_i]``.
    num_rows: rows to fill.
    length: row length.
  Returns:
    ``({feature: int32 [num_rows, length]}, sequences used)``; rows after the last sequence stay
    padding.
  """
  if num_rows <= 0 or length <= 0:
    raise ValueError(f"num_rows and length must be positive, got {num_rows} and {length}.")
  out = {k: np.zeros((num_rows, length), np.int32) for k in FEATURES}
  row, col, segment, used = 0, 0, 0, 0
  for seq in sequences:
    seq = np.asarray(seq, np.int32)[:length]
    n = len(seq)
    if n == 0:
      used += 1
      continue
    if col + n > length:
      row, col, segment = row + 1, 0, 0
    if row >= num_rows:
      break
    segment += 1
    span = slice(col, col + n)
    out["decoder_target_tokens"][row, span] = seq
    out["decoder_input_tokens"][row, span] = np.concatenate([[0], seq[:-1]])
    out["decoder_loss_weights"][row, span] = 1
    out["decoder_segment_ids"][row, span] = segment
    out["decoder_positions"][row, span] = np.arange(n)
    col += n
    used += 1
  return out, used


def sample_rows(
  model: lm.LanguageModel,
  params: PyTree,
  *,
  num_rows: int,
  length: int,
  rng: Array,
  temperature: float = 1.0,
  batch_size: int = 128,
  stop_id: int = decoding.DEFAULT_EOS_ID,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Unconditional samples of ``model`` packed into ``num_rows`` rows of ``length``.

  Draws rounds of ``batch_size`` sequences (BOS only as the prompt, up to
  ``min(length, max_length - 1)`` tokens each, stopping at ``stop_id``) until the tokens drawn
  would fill every row (or ``MAX_SAMPLING_ROUNDS`` rounds), then packs them in order
  (``pack_sequences``). Round ``r`` uses ``fold_in(rng, r)``: the rows are a function of the params
  and the key.

  Returns:
    ``(rows, stats)``: the packed features (int32 ``[num_rows, length]``) and ``sequences``,
    ``mean_length``, ``stopped_fraction`` (sequences that ended with ``stop_id``), ``fill`` (the
    fraction of row positions holding a token), ``rounds``.
  """
  max_decode = min(length, model.config.max_length - 1)
  if max_decode < 1:
    raise ValueError(f"Cannot sample: max_length {model.config.max_length} leaves no room.")
  prompts = np.zeros((batch_size, 0), np.int32)
  sequences: list[np.ndarray] = []
  drawn, rounds, stopped = 0, 0, 0
  while drawn < num_rows * length and rounds < MAX_SAMPLING_ROUNDS:
    result = decoding.generate(
      model,
      params,
      prompts,
      max_decode_len=max_decode,
      rng=jax.random.fold_in(rng, rounds),
      temperature=temperature,
      stop_ids=(stop_id,),
    )
    tokens = distributed.to_host(result.tokens)
    lengths = distributed.to_host(result.lengths)
    for seq, n in zip(tokens, lengths):
      if n > 0:
        sequences.append(seq[:n])
        stopped += int(seq[n - 1] == stop_id)
        drawn += int(n)
    rounds += 1
  rows, used = pack_sequences(sequences, num_rows, length)
  lens = [len(s) for s in sequences[:used]] or [0]
  stats = {
    "sequences": float(used),
    "mean_length": float(np.mean(lens)),
    "stopped_fraction": float(stopped / max(len(sequences), 1)),
    "fill": float(np.mean(rows["decoder_loss_weights"])),
    "rounds": float(rounds),
  }
  return rows, stats


def save_samples(directory: str, rows: Mapping[str, np.ndarray]) -> str:
  """Writes ``rows`` to ``directory/teacher_samples.npz`` atomically (``write_atomic``)."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SAMPLES_FILE)
  arrays = {k: np.asarray(rows[k], np.int32) for k in FEATURES}
  report_plots.write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)
  return path


def load_samples(directory: str) -> dict[str, np.ndarray] | None:
  """The rows saved in ``directory``, or None when there are none."""
  path = os.path.join(directory, SAMPLES_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    return {k: data[k] for k in FEATURES}


def pool_rows(
  earlier: Mapping[str, np.ndarray] | None, new: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """``earlier``'s rows followed by ``new``'s (``[N_earlier + N_new, length]`` per feature);
  ``new`` alone when ``earlier`` is None."""
  if earlier is None:
    return {k: np.asarray(new[k]) for k in FEATURES}
  lengths = {np.shape(earlier[k])[1] for k in FEATURES} | {np.shape(new[k])[1] for k in FEATURES}
  if len(lengths) != 1:
    raise MethodError(
      f"Cannot pool teacher sample rows of lengths {sorted(lengths)}: the schedule's targets "
      "length changed between phases; use teacher_sample_pool = 'latest'."
    )
  return {k: np.concatenate([earlier[k], new[k]], axis=0) for k in FEATURES}


def save_teacher_samples(method: Method, setup: PhaseSetup, start_dir: str) -> dict[str, float]:
  """Samples the previous phase's final model and saves the rows with the phase's start.

  Key ``PRNGKey(schedule.seed + 104729 + index)``; row length = the schedule's ``targets`` length;
  every process samples (collectively, params are sharded) and process 0 writes. With
  ``teacher_sample_pool = "accumulated"`` the previous phase's saved rows come first (``pool_rows``).
  """
  t0 = time.perf_counter()
  schedule, options = setup.schedule, setup.options
  earlier = None
  if options.teacher_sample_pool == "accumulated" and setup.index > 1:
    earlier = load_samples(setup.previous_phase_dir)
    if earlier is None:
      raise MethodError(
        f"teacher_sample_pool = 'accumulated': {setup.previous_phase_dir} has no {SAMPLES_FILE} "
        "to pool (its phase did not distil on teacher samples); use teacher_sample_pool = "
        "'latest'."
      )
  teacher = lm.LanguageModel(
    method.model_config(setup.base_config, schedule, setup.index - 1, options)
  )
  with setup.partitioner.context():
    rows, stats = sample_rows(
      teacher,
      setup.previous_params(),
      num_rows=options.teacher_sample_rows,
      length=int(schedule.task_feature_lengths["targets"]),
      rng=jax.random.PRNGKey(schedule.seed + SAMPLE_SEED_OFFSET + setup.index),
      temperature=options.teacher_sample_temperature,
    )
  rows = pool_rows(earlier, rows)
  if jax.process_index() == 0:
    save_samples(start_dir, rows)
  logging.info(
    "[%s] phase %d: %d teacher sample rows%s (%d sequences, mean length %.1f, %.0f%% ended with "
    "EOS, %.0f%% of positions filled; %.1f s).",
    method.name,
    setup.index,
    options.teacher_sample_rows,
    "" if earlier is None else f" after {len(earlier[FEATURES[0]])} pooled earlier rows",
    stats["sequences"],
    stats["mean_length"],
    100 * stats["stopped_fraction"],
    100 * stats["fill"],
    time.perf_counter() - t0,
  )
  return stats


def phase_distillation(
  setup: PhaseSetup, teacher: lm.LanguageModel, teacher_params: PyTree, **kwargs: Any
) -> "TeacherSampleDistillation":
  """The phase's ``TeacherSampleDistillation`` on the rows saved with its start (``kwargs``: the
  ``Distillation`` hyperparameters)."""
  rows = load_samples(setup.phase_dir)
  if rows is None:
    raise MethodError(
      f"{setup.phase_dir} has no {SAMPLES_FILE} (distill_inputs was 'batch' when this phase "
      "started): delete the phase folder to rebuild its start."
    )
  return TeacherSampleDistillation(
    teacher,
    teacher_params,
    rows,
    on_batch=setup.options.distill_inputs == "both",
    batch_size=setup.options.teacher_sample_batch,
    **kwargs,
  )


class TeacherSampleDistillation(distill.Distillation):
  """``weight * T^2 KL(teacher || student)`` on a batch of the teacher's own sample rows (plus the
  new-batch term of ``distill.Distillation`` when ``on_batch``).

  Args:
    teacher_model / teacher_params / temperature / weight / router_weight: as ``Distillation``
      (the router-level term, if any, is on the new batch only).
    rows: ``{feature: int [N, length]}`` (``pack_sequences`` layout), the phase's sample rows.
    on_batch: also distil on the step's new-data batch (``distill_inputs = "both"``).
    batch_size: rows per step (0: as many as the train batch; fewer cut the extra step cost).
    router_rehearsal: a ``router_rehearsal.RouterRehearsal`` without Gaussians
      (``router_rehearsal_inputs = "teacher_samples"``): its term is added with the router inputs
      of the sample rows (captured in the same student forward pass) as the old inputs and the new
      batch's as the new ones; None: no router rehearsal here.

  Metrics: ``kl_samples`` (and ``kl``, ``router_kl`` from the batch term when ``on_batch``;
  ``router_rehearsal/{new,old,new_mass,old_new_mass}`` with ``router_rehearsal``).
  """

  def __init__(
    self,
    teacher_model: lm.LanguageModel,
    teacher_params: PyTree,
    rows: Mapping[str, np.ndarray],
    *,
    on_batch: bool = False,
    batch_size: int = 0,
    router_rehearsal: Any = None,
    **kwargs: Any,
  ):
    super().__init__(teacher_model, teacher_params, **kwargs)
    self.router_rehearsal = router_rehearsal
    if batch_size < 0:
      raise ValueError(f"batch_size must be >= 0 (0: the train batch's), got {batch_size}.")
    self.batch_size = int(batch_size)
    missing = [k for k in FEATURES if k not in rows]
    if missing:
      raise ValueError(f"Teacher sample rows lack feature(s) {missing}.")
    shapes = {np.shape(rows[k]) for k in FEATURES}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
      raise ValueError(f"Teacher sample rows must all be [N, length], got shapes {shapes}.")
    self.rows = {k: np.asarray(rows[k], np.int32) for k in FEATURES}
    self.on_batch = bool(on_batch)
    if self.router_weight > 0 and not self.on_batch:
      raise ValueError(
        "Router-level distillation acts on the new batch: with distillation on teacher samples "
        "only (distill_inputs='teacher_samples') set router_distill_weight = 0, or use "
        "distill_inputs='both'."
      )
    self.uses_router_logits = (self.uses_router_logits and self.on_batch) or (
      router_rehearsal is not None
    )
    self.uses_router_inputs = router_rehearsal is not None
    self.student_model: lm.LanguageModel | None = None

  def init_state(self, ctx: Any) -> tuple[Any, Any]:
    """``({"teacher", "rows"}, axes)``: the teacher params (sharded like the student's) and the
    rows (replicated; a step's batch of them is split over the batch axes)."""
    teacher, teacher_axes = super().init_state(ctx)
    length = next(iter(self.rows.values())).shape[1]
    if length > ctx.model.config.max_length:
      raise ValueError(
        f"Teacher sample rows have length {length} > the student's max_length "
        f"{ctx.model.config.max_length}."
      )
    self.student_model = ctx.model
    return (
      {"teacher": teacher, "rows": dict(self.rows)},
      {"teacher": teacher_axes, "rows": {k: P(None, None) for k in self.rows}},
    )

  def sample_batch(self, rows: Mapping[str, Array], batch_size: int, rng: Array) -> dict:
    """``batch_size`` rows drawn uniformly with replacement: ``{feature: [batch_size, length]}``."""
    num = next(iter(rows.values())).shape[0]
    index = jax.random.randint(rng, (batch_size,), 0, num)
    return {k: nn.with_logical_constraint(v[index], ("batch", "length")) for k, v in rows.items()}

  def __call__(
    self,
    params: Any,
    batch: lm.Batch,
    student_logits: Array,
    aux_state: Any,
    rng: Array | None = None,
    intermediates: Any = None,
  ) -> tuple[Array, dict[str, Array]]:
    """``(term, metrics)``; ``aux_state`` is ``init_state``'s ``{"teacher", "rows"}``."""
    if self.student_model is None:
      raise ValueError("TeacherSampleDistillation.init_state must run before the loss.")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    pick_rng, model_rng = jax.random.split(rng)
    teacher_params = aux_state["teacher"]
    total, metrics = 0.0, {}
    if self.on_batch:
      total, metrics = super().__call__(
        params, batch, student_logits, teacher_params, rng, intermediates
      )
      metrics = dict(metrics)
    size = self.batch_size or batch["decoder_target_tokens"].shape[0]
    pseudo = self.sample_batch(aux_state["rows"], size, pick_rng)
    capture = (
      router_probe.capture_router(logits=False, token_inputs=True)
      if self.router_rehearsal is not None
      else contextlib.nullcontext()
    )
    with capture:
      student, pseudo_inter, _ = self.student_model.apply(params, pseudo, train=True, rng=model_rng)
    if self.router_rehearsal is not None:
      term, rehearsal_metrics = self._router_rehearsal_term(
        params, batch, intermediates, pseudo, pseudo_inter
      )
      total = total + term
      metrics.update(rehearsal_metrics)
    kl = distill.distillation_loss(
      student,
      self.teacher_logits(teacher_params, pseudo),
      lm.loss_weights_of(pseudo),
      self.temperature,
    )
    metrics["kl_samples"] = kl
    return total + self.weight * kl, metrics

  def _router_rehearsal_term(
    self, params: Any, batch: lm.Batch, intermediates: Any, pseudo: dict, pseudo_inter: Any
  ) -> tuple[Array, dict[str, Array]]:
    """The router rehearsal (term, metrics): the new batch's router inputs are its new inputs,
    the sample rows' its old ones (both captured in the student's forward passes)."""
    config = self.student_model.config
    key = router_probe.ROUTER_INPUTS
    x_new = (
      None
      if intermediates is None
      else router_probe.collect_router_stats(intermediates, config).get(key)
    )
    if x_new is None:
      raise ValueError(
        "The router rehearsal on teacher samples needs the student's intermediates with router "
        "inputs (training.losses.training_loss captures them for uses_router_inputs)."
      )
    x_old = router_probe.collect_router_stats(pseudo_inter, config)[key]
    term, metrics = self.router_rehearsal.terms(
      params, x_new, lm.token_mask_of(batch), x_old, lm.token_mask_of(pseudo)
    )
    return term, {f"router_rehearsal/{k}": v for k, v in metrics.items()}
