"""Router rehearsal: the new router columns learn to tell the new data from Gaussian stand-ins of
the earlier distributions' router inputs (``MethodOptions.router_rehearsal_weight``).

The study (docs/study.md) found that the router trained on new data only gets no signal that
separates old tokens from new ones, so the new experts take the same share of every distribution.
A linear probe on the router input of the phase-A model, trained with both distributions' labels,
does separate them in part (docs/study.md, "Can a router separate the distributions?"). This
mechanism gives the router that contrast without old data: when a phase starts, the mean and
second moment of the previous phase's router inputs (its own train data, its final params) are
measured and appended to those saved with the previous phase, like EWC's Fisher or the router
projection's means (``<phase folder>/old_router_moments.npz``: ``mean [P, M, embed]``,
``second_moment [P, M, embed, embed]``). In every step, per MoE layer m,

    P_new(x) = sum_{e >= E_old} softmax(x W_m)_e                      (W_m: the router kernel)
    new  = mean over the batch's real tokens of  -log P_new(x)           (x: the step's router inputs)
    old  = mean over synthetic x ~ N(mu_{p,m}, Sigma_{p,m}) of  -log(1 - P_new(x))
    term = weight * mean_m (new + old)

with ``router_rehearsal_samples`` fresh samples per earlier phase p and layer per step
(``Sigma = E[x x^T] - mu mu^T``). Both halves train the router kernels only: the batch's router
inputs (captured by ``models.router_probe`` with ``token_inputs=True``) enter without gradient,
and the old columns are frozen by the method, so only the phase's new columns move. (A first
version let the batch half's gradient reach the shared weights that feed the routers: in the study
those weights then moved every token's router input towards the new columns, old ones included,
while the fixed Gaussians stayed put; docs/study.md.) The Gaussians are measured under the previous
phase's final params: as the shared weights move during the phase, the real old inputs move away
from them (which the term does not see).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import flax.linen as nn

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from lifelong_moe_jax import param_tree
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import report_plots
from lifelong_moe_jax.lifelong import router_input
from lifelong_moe_jax.lifelong.method_options import MethodError
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.models.config import ModelConfig

if TYPE_CHECKING:
  from lifelong_moe_jax.lifelong.methods import Method, PhaseSetup

Array = jax.Array
PyTree = Any
MOMENTS_FILE = "old_router_moments.npz"


def gaussian_factors(
  mean: np.ndarray, second_moment: np.ndarray, jitter: float = 1e-4
) -> np.ndarray:
  """Cholesky factors ``L`` with ``L L^T = Sigma + jitter * (tr Sigma / embed) I``.

  Args:
    mean: ``[..., embed]``.
    second_moment: ``[..., embed, embed]``, ``E[x x^T]``.
    jitter: relative ridge that keeps a rank-deficient covariance factorable.
  Returns:
    float32 ``[..., embed, embed]`` lower-triangular.
  """
  mean = np.asarray(mean, np.float64)
  second = np.asarray(second_moment, np.float64)
  if second.shape != mean.shape + mean.shape[-1:]:
    raise ValueError(f"second moment {second.shape} does not match mean {mean.shape}.")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(second))):
    raise ValueError("Router-input moments have non-finite entries.")
  cov = second - mean[..., :, None] * mean[..., None, :]
  cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
  d = mean.shape[-1]
  scale = np.trace(cov, axis1=-2, axis2=-1)[..., None, None] / d
  cov = cov + (jitter * np.maximum(scale, 1e-12)) * np.eye(d)
  return np.linalg.cholesky(cov).astype(np.float32)


def new_expert_log_mass(logits: Array, num_old: int) -> tuple[Array, Array]:
  """``(log P_new, log P_old)`` of the router's softmax: ``[..., E] -> [...]`` each."""
  logits = logits.astype(jnp.float32)
  total = jax.nn.logsumexp(logits, axis=-1)
  return (
    jax.nn.logsumexp(logits[..., num_old:], axis=-1) - total,
    jax.nn.logsumexp(logits[..., :num_old], axis=-1) - total,
  )


def rehearsal_terms(
  router_logits: Array,
  token_mask: Array,
  old_logits: Array,
  num_old: int,
  old_weights: Array | None = None,
) -> tuple[Array, Array]:
  """Per-layer ``(new, old)`` terms.

  Args:
    router_logits: float32 ``[M, G, S, E]``, the step's router logits (``router_probe``).
    token_mask: ``[batch, length]`` real tokens (``G * S = batch * length``).
    old_logits: float32 ``[M, N, E]``, router logits of N old inputs per layer (synthetic, or the
      tokens of the teacher's sample rows).
    num_old: experts ``[0, num_old)`` are the earlier phases'.
    old_weights: optional ``[N]`` weights of the old inputs (the sample rows' token mask); None:
      all equal.
  Returns:
    float32 ``[M]`` each: ``mean_tokens -log P_new`` and ``mean_old_inputs -log P_old``.
  """
  if not 0 < num_old < router_logits.shape[-1]:
    raise ValueError(f"num_old must be in (0, {router_logits.shape[-1]}), got {num_old}.")
  mask = token_mask.astype(jnp.float32).reshape(router_logits.shape[1:3])
  log_new, _ = new_expert_log_mass(router_logits, num_old)  # [M, G, S]
  new = -jnp.sum(log_new * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0)
  _, log_old = new_expert_log_mass(old_logits, num_old)  # [M, N]
  if old_weights is None:
    return new, -jnp.mean(log_old, axis=-1)
  w = old_weights.astype(jnp.float32).reshape(-1)
  return new, -jnp.sum(log_old * w, axis=-1) / jnp.maximum(jnp.sum(w), 1.0)


def router_kernel_layers(abstract_params: PyTree, params_axes: PyTree, num_moe_layers: int):
  """``(treedef, [(leaf index, layer rows)])``: where each MoE layer's router kernel is.

  ``layer rows`` is an int array of the MoE layers (``lm.collect_moe_stats`` order) the leaf holds:
  one for an unscanned kernel ``[embed, E]``, one per block for a scanned ``[blocks, embed, E]``.
  """
  treedef, infos = param_tree.flatten_with_axes(abstract_params, params_axes)
  index = np.arange(num_moe_layers, dtype=np.float64)[:, None]
  rows = param_tree.moe_layer_rows(infos, index, "MoE layer index")
  found = []
  for position, info in enumerate(infos):
    if not expansion.is_router_leaf(info):
      continue
    if info.layers_axis not in (None, 0):
      raise ValueError(f"{info.key}: a scanned router kernel must have its layers axis first.")
    embed_axis = param_tree.axis_of(info.spec, "embed")
    wanted = (1, 2) if info.layers_axis == 0 else (0, 1)
    if (embed_axis, info.expert_axis) != wanted:
      raise ValueError(f"{info.key}: expected a router kernel [(layers,) embed, expert].")
    found.append((position, np.asarray(rows[info.key]).reshape(-1).astype(int)))
  layers = sorted(int(m) for _, r in found for m in r)
  if layers != list(range(num_moe_layers)):
    raise ValueError(f"Router kernels cover MoE layers {layers}, expected 0..{num_moe_layers - 1}.")
  return treedef, found


class RouterRehearsal:
  """Regularizer: ``weight * mean_m (new_m + old_m)`` (module docstring).

  Args:
    config: the student model (E experts).
    num_old: experts before this phase (E_old).
    abstract_params / params_axes: the student's params (shapes) and logical axes.
    mean: float ``[P, M, embed]`` earlier distributions' mean router inputs; None when the old
      inputs are the teacher's sample rows (``router_rehearsal_inputs = "teacher_samples"``: then
      ``pseudo_rehearsal.TeacherSampleDistillation`` calls ``terms`` with them, and this object is
      not a regularizer of its own).
    second_moment: float ``[P, M, embed, embed]`` (None with ``mean``).
    weight: the term's weight (> 0).
    num_samples: synthetic inputs per earlier distribution and MoE layer per step.
    name: the hook's name (metrics ``reg/<name>/new``, ``reg/<name>/old``, ``.../new_mass``,
      ``.../old_new_mass``: mean ``P_new`` on the batch and on the synthetic inputs).
  """

  uses_router_logits = True
  uses_router_inputs = True

  def __init__(
    self,
    config: ModelConfig,
    num_old: int,
    abstract_params: PyTree,
    params_axes: PyTree,
    mean: np.ndarray | None,
    second_moment: np.ndarray | None,
    *,
    weight: float,
    num_samples: int = 256,
    name: str = "router_rehearsal",
  ):
    if not config.is_moe or not 0 < num_old < config.num_experts:
      raise ValueError(
        f"RouterRehearsal needs an MoE model with new experts: num_old={num_old}, "
        f"num_experts={config.num_experts}."
      )
    if weight <= 0 or num_samples <= 0:
      raise ValueError(f"weight and num_samples must be positive, got {weight}, {num_samples}.")
    num_moe = config.num_layers // config.moe_every
    self.config = config
    self.num_old = int(num_old)
    self.mean = self.chol = None
    if mean is not None:
      mean = np.asarray(mean, np.float64)
      if mean.ndim != 3 or mean.shape[1:] != (num_moe, config.embed_dim):
        raise ValueError(
          f"Router-input means {mean.shape} do not fit the model: expected "
          f"[phases, {num_moe}, {config.embed_dim}]."
        )
      self.mean = mean.astype(np.float32)
      self.chol = gaussian_factors(mean, second_moment)
    self.weight = float(weight)
    self.num_samples = int(num_samples)
    self.name = name
    self.treedef, self.kernels = router_kernel_layers(abstract_params, params_axes, num_moe)

  def init_state(self, ctx: Any) -> tuple[Any, Any]:
    """The Gaussians, replicated: ``{"mean": [P, M, d], "chol": [P, M, d, d]}``."""
    del ctx
    if self.mean is None:
      raise ValueError(
        "This RouterRehearsal has no Gaussians (its old inputs are teacher sample rows): it is "
        "part of pseudo_rehearsal.TeacherSampleDistillation, not a regularizer of its own."
      )
    state = {"mean": jnp.asarray(self.mean), "chol": jnp.asarray(self.chol)}
    return state, {"mean": P(), "chol": P()}

  def stacked_kernels(self, params: PyTree) -> Array:
    """float32 ``[M, embed, E]``: every MoE layer's router kernel, in MoE layer order."""
    leaves = self.treedef.flatten_up_to(params)
    by_layer = {}
    for position, rows in self.kernels:
      kernel = leaves[position].astype(jnp.float32)
      kernel = kernel[None] if kernel.ndim == 2 else kernel
      for block, m in enumerate(rows):
        by_layer[int(m)] = kernel[block]
    return jnp.stack([by_layer[m] for m in range(len(by_layer))])

  def synthetic_inputs(self, aux_state: Any, rng: Array) -> Array:
    """float32 ``[M, P * num_samples, embed]`` drawn from the earlier distributions' Gaussians."""
    mean, chol = aux_state["mean"], aux_state["chol"]
    phases, layers, d = mean.shape
    z = jax.random.normal(rng, (phases, layers, self.num_samples, d), jnp.float32)
    x = mean[:, :, None, :] + jnp.einsum("pmde,pmse->pmsd", chol, z)
    return jnp.moveaxis(x, 0, 1).reshape(layers, phases * self.num_samples, d)

  def __call__(
    self,
    params: PyTree,
    batch: lm.Batch,
    student_logits: Array,
    aux_state: Any,
    rng: Array | None = None,
    intermediates: Any = None,
  ) -> tuple[Array, dict[str, Array]]:
    del student_logits
    if intermediates is None or rng is None:
      raise ValueError(
        "RouterRehearsal needs the student's intermediates with router logits and a key "
        "(training.losses.training_loss passes both)."
      )
    x_new = router_probe.collect_router_stats(intermediates, self.config).get(
      router_probe.ROUTER_INPUTS
    )
    if x_new is None:
      raise ValueError(
        "RouterRehearsal found no router inputs in the student's intermediates (run the forward "
        "pass under models.router_probe.capture_router(token_inputs=True))."
      )
    return self.terms(params, x_new, lm.token_mask_of(batch), self.synthetic_inputs(aux_state, rng))

  def terms(
    self,
    params: PyTree,
    x_new: Array,
    token_mask: Array,
    x_old: Array,
    old_weights: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """``(weight * mean_m (new_m + old_m), metrics)`` for given router inputs.

    Args:
      params: the student's params (the router kernels are read from them).
      x_new: ``[M, G, S, embed]`` the new batch's router inputs.
      token_mask: ``[batch, length]`` its real tokens.
      x_old: ``[M, N, embed]`` old inputs (synthetic), or ``[M, G', S', embed]`` (the router
        inputs of the teacher's sample rows, with ``old_weights`` their ``[batch', length]`` mask).
      old_weights: see ``x_old``; None: all old inputs count equally.
    """
    kernels = self.stacked_kernels(params)
    # The router inputs enter without gradient: the term trains the router columns only.
    logits = jnp.einsum("mgsd,mde->mgse", jax.lax.stop_gradient(x_new), kernels)
    x_old = jax.lax.stop_gradient(x_old).reshape(x_old.shape[0], -1, x_old.shape[-1])
    old_logits = jnp.einsum("mnd,mde->mne", x_old, kernels)
    new, old = rehearsal_terms(logits, token_mask, old_logits, self.num_old, old_weights)
    new, old = jnp.mean(new), jnp.mean(old)
    w = jnp.ones(x_old.shape[1], jnp.float32) if old_weights is None else old_weights
    w = w.astype(jnp.float32).reshape(-1)
    old_mass = jnp.exp(new_expert_log_mass(old_logits, self.num_old)[0])  # [M, N]
    metrics = {
      "new": new,
      "old": old,
      "new_mass": jnp.mean(jnp.exp(new_expert_log_mass(logits, self.num_old)[0])),
      "old_new_mass": jnp.mean(jnp.sum(old_mass * w, axis=-1) / jnp.maximum(jnp.sum(w), 1.0)),
    }
    return self.weight * (new + old), metrics


def save_moments(directory: str, mean: np.ndarray, second_moment: np.ndarray) -> str:
  """Writes ``directory/old_router_moments.npz`` atomically (``report_plots.write_atomic``)."""
  path = os.path.join(directory, MOMENTS_FILE)
  arrays = {"mean": np.asarray(mean, np.float64), "second_moment": np.asarray(second_moment)}
  report_plots.write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)
  return path


def load_moments(directory: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(mean [P, M, d], second_moment [P, M, d, d])`` saved in ``directory``, or None."""
  path = os.path.join(directory, MOMENTS_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    return data["mean"], data["second_moment"]


def accumulated_moments(method: Method, setup: PhaseSetup) -> tuple[np.ndarray, np.ndarray]:
  """The previous phase's router-input moments (its own distribution's train data, its final
  params, ``usage_batches`` batches) appended to those saved with the previous phase:
  ``(mean [P, M, d], second_moment [P, M, d, d])``, one row per earlier distribution."""
  mean, second = router_input.measure_previous_phase_moments(method, setup)
  earlier = load_moments(setup.previous_phase_dir)
  if earlier is not None:
    return (
      np.concatenate([earlier[0], mean[None]], axis=0),
      np.concatenate([earlier[1], second[None]], axis=0),
    )
  return mean[None], second[None]


def save_accumulated_moments(method: Method, setup: PhaseSetup, start_dir: str):
  """``accumulated_moments`` (``setup.earlier_router_moments`` when the phase start already
  measured them) written to ``start_dir`` by process 0 (for the router rehearsal and the
  ``copy_contrast`` router columns of the following phases); returns them."""
  t0 = time.perf_counter()
  mean, second = setup.earlier_router_moments or accumulated_moments(method, setup)
  if jax.process_index() == 0:  # every process measured (collectively); one writes
    os.makedirs(start_dir, exist_ok=True)
    save_moments(start_dir, mean, second)
  logging.info(
    "[%s] phase %d: router-input moments of %d earlier distribution(s) saved (%.1f s).",
    method.name,
    setup.index,
    mean.shape[0],
    time.perf_counter() - t0,
  )
  return mean, second


def phase_regularizer(method: Method, setup: PhaseSetup, added: int) -> "RouterRehearsal":
  """The ``RouterRehearsal`` of a phase, on the moments saved with its start."""
  if setup.options.router_rehearsal_inputs == "teacher_samples":
    moments = (None, None)  # the old inputs are the teacher's sample rows
  else:
    moments = load_moments(setup.phase_dir)
  if moments is None:
    raise MethodError(
      f"{setup.phase_dir} has no {MOMENTS_FILE} (router_rehearsal_weight was 0 when this phase "
      "started): delete the phase folder to rebuild its start."
    )
  config = method.model_config(setup.base_config, setup.schedule, setup.index, setup.options)
  model = lm.LanguageModel(config)
  logging.info(
    "[%s] phase %d: router rehearsal against %s, weight %g.",
    method.name,
    setup.index,
    "the teacher's sample rows"
    if moments[0] is None
    else f"{moments[0].shape[0]} earlier distribution(s)",
    setup.options.router_rehearsal_weight,
  )
  return RouterRehearsal(
    config,
    config.num_experts - added,
    nn.unbox(model.abstract_params()),
    model.params_logical_axes(),
    *moments,
    weight=setup.options.router_rehearsal_weight,
    num_samples=setup.options.router_rehearsal_samples,
  )
