"""Quadratic anchor penalties for the L2 and EWC baselines.

Both penalise distance to the previous phase's final params ``theta*`` (the anchor):

* L2 (online L2): ``(weight / 2) * sum_i m_i (theta_i - theta*_i)^2`` with ``m_i = 1``;
* EWC: ``(weight / 2) * sum_i F_i (theta_i - theta*_i)^2`` with ``F`` the diagonal (empirical)
  Fisher of the LM loss estimated on the previous phase's data at its end (``estimate_fisher``).

An anchor is a ``QuadraticAnchor(anchor, importance)``; when the model grows between phases,
``QuadraticAnchor.expand_to`` grows both so that they match the expanded params, with importance 0
on the new expert slices (new experts are not anchored; old slices are).

``L2Penalty`` and ``EWCPenalty`` implement the trainer's regularizer hook (see
``distill.Regularizer``): ``init_state`` hands their ``QuadraticAnchor`` and its logical axes to
the trainer, which shards it like the params and passes it to ``__call__`` as ``aux_state``.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax.param_tree import flatten_with_axes, pad_experts
from lifelong_moe_jax.models.lm import (
  Batch,
  LanguageModel,
  loss_weights_of,
  token_log_likelihood,
)

Array = jax.Array


@flax.struct.dataclass
class QuadraticAnchor:
  """Anchor params and per-entry importance (a pytree: can live in the trainer's aux_state).

  Attributes:
    anchor: params pytree ``theta*``.
    importance: params-structured pytree; each leaf broadcastable to its param (L2 uses
      ``[1, .., 1]`` ones before any expansion, EWC the Fisher with the params' shapes).
  """

  anchor: Any
  importance: Any

  def expand_to(self, params_axes: Any, add_experts: int) -> "QuadraticAnchor":
    """Grows anchor and importance along the ``expert`` axis: new slices get importance 0.

    Args:
      params_axes: logical axes of the anchor params (before expansion).
      add_experts: N, as given to ``surgery.expand_params``.
    """
    if add_experts < 0:
      raise ValueError(f"add_experts must be >= 0, got {add_experts}.")
    if add_experts == 0:
      return self
    treedef, infos = flatten_with_axes(self.anchor, params_axes)
    importance = treedef.flatten_up_to(self.importance)
    anchors, weights = [], []
    for info, imp in zip(infos, importance):
      if info.expert_axis is None:
        anchors.append(info.value)
        weights.append(imp)
        continue
      ea = info.expert_axis
      anchors.append(pad_experts(info.value, ea, add_experts, info.key))
      num_experts = np.shape(info.value)[ea]
      if np.shape(imp)[ea] == 1 and num_experts != 1:  # broadcast mask: materialise the axis.
        shape = list(np.shape(imp))
        shape[ea] = num_experts
        imp = np.broadcast_to(np.asarray(imp), shape)
      weights.append(pad_experts(imp, ea, add_experts, info.key + " (importance)"))
    return QuadraticAnchor(
      jax.tree_util.tree_unflatten(treedef, anchors), jax.tree_util.tree_unflatten(treedef, weights)
    )

  def logical_axes(self, params_axes: Any) -> "QuadraticAnchor":
    """Logical axes of this anchor: the params' for ``anchor``; for ``importance`` the same with
    broadcast (size-1) dimensions left unsharded."""
    treedef, infos = flatten_with_axes(self.anchor, params_axes)
    specs = []
    for info, imp in zip(infos, treedef.flatten_up_to(self.importance)):
      spec = tuple(info.spec or ()) + (None,) * (np.ndim(imp) - len(info.spec or ()))
      specs.append(P(*(None if np.shape(imp)[d] == 1 else spec[d] for d in range(np.ndim(imp)))))
    return QuadraticAnchor(params_axes, jax.tree_util.tree_unflatten(treedef, specs))


def l2_anchor(params: Any) -> QuadraticAnchor:
  """Anchor at ``params`` with importance 1 everywhere (stored as ``[1, .., 1]`` ones)."""
  ones = jax.tree_util.tree_map(lambda p: np.ones((1,) * np.ndim(p), np.float32), params)
  return QuadraticAnchor(params, ones)


def ewc_anchor(params: Any, fisher: Any) -> QuadraticAnchor:
  """Anchor at ``params`` weighted by the diagonal Fisher (same structure and shapes)."""
  for p, f in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(fisher)):
    if np.shape(p) != np.shape(f):
      raise ValueError(f"Fisher leaf of shape {np.shape(f)} does not match param {np.shape(p)}.")
  return QuadraticAnchor(params, fisher)


def quadratic_distance(params: Any, anchor: QuadraticAnchor) -> Array:
  """float32 ``sum_i importance_i * (params_i - anchor_i)^2`` (no gradient to the anchor)."""
  anchor = jax.lax.stop_gradient(anchor)
  p_leaves, treedef = jax.tree_util.tree_flatten(params)
  a_leaves = treedef.flatten_up_to(anchor.anchor)
  w_leaves = treedef.flatten_up_to(anchor.importance)
  total = jnp.zeros((), jnp.float32)
  for p, a, w in zip(p_leaves, a_leaves, w_leaves):
    if np.shape(p) != np.shape(a):
      raise ValueError(
        f"Anchor leaf {np.shape(a)} does not match param {np.shape(p)}: expand the "
        "anchor with QuadraticAnchor.expand_to after surgery."
      )
    diff = p.astype(jnp.float32) - a.astype(jnp.float32)
    total = total + jnp.sum(jnp.asarray(w, jnp.float32) * diff * diff)
  return total


class _AnchorPenalty:
  """``(weight / 2) * quadratic_distance(params, anchor)`` as a trainer regularizer."""

  def __init__(self, weight: float = 1.0, anchor: QuadraticAnchor | None = None, *, name: str):
    if weight < 0:
      raise ValueError(f"{type(self).__name__}.weight must be >= 0, got {weight}.")
    self.weight = float(weight)
    self.anchor = anchor
    self.name = name

  def init_state(self, ctx: Any) -> tuple[QuadraticAnchor, QuadraticAnchor]:
    """``(anchor, its logical axes)``; the anchor must match the (expanded) params' shapes."""
    if self.anchor is None:
      raise ValueError(
        f"{type(self).__name__} needs an anchor: the previous phase's final params "
        "as a QuadraticAnchor (l2_anchor / ewc_anchor, then expand_to after "
        "surgery)."
      )
    for p, a in zip(
      jax.tree_util.tree_leaves(ctx.params), jax.tree_util.tree_leaves(self.anchor.anchor)
    ):
      if np.shape(p) != np.shape(a):
        raise ValueError(
          f"Anchor leaf {np.shape(a)} does not match param {np.shape(p)}: expand "
          "the anchor with QuadraticAnchor.expand_to(params_axes, add_experts)."
        )
    return self.anchor, self.anchor.logical_axes(ctx.params_axes)

  def __call__(
    self,
    params: Any,
    batch: Batch,
    student_logits: Array,
    aux_state: QuadraticAnchor,
    rng: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Returns ``((weight / 2) * distance, {"distance": distance})``; aux_state is the anchor."""
    del batch, student_logits, rng
    distance = quadratic_distance(params, aux_state)
    return 0.5 * self.weight * distance, {"distance": distance}


class L2Penalty(_AnchorPenalty):
  """Online L2 to the previous phase's final params: ``(weight/2) * sum m (theta - theta*)^2``.

  ``anchor``: ``l2_anchor(previous params)`` (then ``expand_to`` after surgery).
  """

  def __init__(
    self, weight: float = 1.0, anchor: QuadraticAnchor | None = None, *, name: str = "l2"
  ):
    super().__init__(weight, anchor, name=name)


class EWCPenalty(_AnchorPenalty):
  """EWC: ``(weight/2) * sum F (theta - theta*)^2`` with the diagonal Fisher ``F``.

  ``anchor``: ``ewc_anchor(previous params, estimate_fisher(...))`` (then ``expand_to``).
  """

  def __init__(
    self, weight: float = 1.0, anchor: QuadraticAnchor | None = None, *, name: str = "ewc"
  ):
    super().__init__(weight, anchor, name=name)


FISHER_ESTIMATORS = ("sampled_tokens", "batch_gradient")


def estimate_fisher(
  model: LanguageModel,
  params: Any,
  batches: Iterable[Batch],
  *,
  num_batches: int | None = None,
  loss: str = "cross_entropy",
  estimator: str = "sampled_tokens",
  rng: jax.Array | None = None,
) -> Any:
  """Diagonal Fisher of the LM loss on ``batches`` at ``params`` (eval mode, no jitter).

  Estimators:

  * ``"sampled_tokens"`` (default): the per-token Fisher ``E_t E_{y ~ p(.|x_<t)} [g_t(y)^2]``.
    Each batch draws one label ``y_t`` per target token from the model itself and contributes
    ``(sum_t w_t g_t(y_t))^2 / sum_t w_t`` with ``g_t(y) = d(-log p(y | x_<t)) / d theta``: the
    sampled labels' gradients have mean zero given the inputs and are drawn independently, so
    the cross terms vanish in expectation and this is an unbiased estimate of the per-token
    Fisher from one backward pass. Its scale does not depend on the batch size, so
    ``EWCPenalty.weight`` has the Bayesian meaning "tokens of old data the anchor is worth, per
    new-data token" (the old phase's token count over the new phase's is the posterior's weight).
  * ``"batch_gradient"``: ``(1/B) sum_b (d L_b / d theta)^2`` with ``L_b`` the batch's mean token
    loss on the data's own labels (``loss`` chooses it). The square of a mean gradient shrinks
    with the batch's token count (about ``1/N`` of the per-token Fisher at convergence), so its
    weights are about ``N`` times the sampled estimator's (the study's runs before the change).

  Args:
    model: the LanguageModel of ``params``.
    params: unboxed params (the previous phase's final params).
    batches: batches of the previous phase's data.
    num_batches: stop after this many batches (default: exhaust ``batches``).
    loss: ``"batch_gradient"`` only: ``"cross_entropy"`` (default) or ``"total"`` (with the router
      auxiliary losses).
    estimator: ``"sampled_tokens"`` or ``"batch_gradient"``.
    rng: the sampled labels' key (batch ``b`` uses ``fold_in(rng, b)``; default ``PRNGKey(0)``).
  Returns:
    float32 params-structured pytree (same shapes as the params).
  """
  if loss not in ("cross_entropy", "total"):
    raise ValueError(f"loss must be 'cross_entropy' or 'total', got {loss!r}.")
  if estimator not in FISHER_ESTIMATORS:
    raise ValueError(f"estimator must be one of {FISHER_ESTIMATORS}, got {estimator!r}.")
  if estimator == "sampled_tokens" and loss != "cross_entropy":
    raise ValueError(
      "The sampled_tokens Fisher is of the log-likelihood only: use loss='cross_entropy'."
    )
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def batch_gradient_objective(p, batch, key):
    del key
    total, metrics = model.loss(p, batch)
    return (metrics["cross_entropy"] if loss == "cross_entropy" else total), 1.0

  def sampled_objective(p, batch, key):
    logits = model.logits(p, batch).astype(jnp.float32)
    labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
    weights = loss_weights_of(batch)
    nll = -token_log_likelihood(logits, labels)
    return jnp.sum(nll * weights), jnp.maximum(jnp.sum(weights), 1.0)

  objective = sampled_objective if estimator == "sampled_tokens" else batch_gradient_objective

  @jax.jit
  def accumulate(acc, p, batch, key):
    grads, count = jax.grad(objective, has_aux=True)(p, batch, key)
    return jax.tree_util.tree_map(
      lambda a, g: a + jnp.square(g.astype(jnp.float32)) / count, acc, grads
    )

  acc = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
  count = 0
  for batch in batches:
    if num_batches is not None and count >= num_batches:
      break
    acc = accumulate(acc, params, batch, jax.random.fold_in(rng, count))
    count += 1
  if count == 0:
    raise ValueError("estimate_fisher got no batches.")
  return jax.tree_util.tree_map(lambda a: a / count, acc)


# ------------------------------------------------------------------------------- Fisher storage
def save_fisher(directory: str, fisher: Any) -> None:
  """Writes a Fisher pytree with orbax (sharded arrays are written shard by shard)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    ckptr.save(checkpoints.absolute(directory), args=ocp.args.PyTreeSave(fisher))


def load_fisher(directory: str, abstract: Any) -> Any:
  """Reads a Fisher pytree saved by ``save_fisher`` into ``abstract``'s shapes and shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  restore_args = jax.tree_util.tree_map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
    abstract,
  )
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(
      checkpoints.absolute(directory),
      args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args),
    )
