"""The language-model object the trainer, evaluators and lifelong tools use.

``LanguageModel`` wraps the flax ``Decoder`` with pure functions over params:

* ``loss(params, batch)``: weighted token cross-entropy + ``aux_loss_weight * aux`` +
  ``router_z_loss_weight * z`` (router losses averaged over MoE layers), with metrics;
* ``score(params, batch)``: per-example sum of target-token log-likelihoods ``[batch]``;
* ``logits(params, batch)``: ``[batch, length, vocab]`` float32.

Batches use seqio's ``DecoderFeatureConverter`` keys, int32 ``[batch, length]``:
``decoder_input_tokens``, ``decoder_target_tokens``, optional ``decoder_loss_weights``
(default: target != 0), ``decoder_segment_ids`` and ``decoder_positions`` (packed data).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.transformer import Decoder

Array = jax.Array
Batch = Mapping[str, Array]
MOE_STATS = ("aux_loss", "z_loss", "expert_fraction", "tokens_per_expert", "dropped_fraction")
# Sown as well but gathered only on request (routing analysis), not in every train step's metrics.
ROUTING_STATS = MOE_STATS + ("top1_fraction",)


def token_mask_of(batch: Batch) -> Array:
  """bool [batch, length]: True for real (non-padding) tokens."""
  if "decoder_segment_ids" in batch:
    return batch["decoder_segment_ids"] > 0
  return batch["decoder_target_tokens"] > 0


def loss_weights_of(batch: Batch) -> Array:
  """float32 [batch, length] per-token loss weights."""
  if "decoder_loss_weights" in batch:
    return batch["decoder_loss_weights"].astype(jnp.float32)
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def values_by_moe_layer(
  intermediates: Any, config: ModelConfig, names: Sequence[str]
) -> dict[int, dict[str, Array]]:
  """``{layer index: {name: value}}`` of the sown values called ``names``.

  Unscanned trees sow under ``layers_<i>``; scanned ones under ``blocks/layer_<j>`` with a leading
  block axis, whose row ``b`` is layer ``b * moe_every + j``.
  """
  per_layer: dict[int, dict[str, Array]] = {}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  for path, value in flat.items():
    name = path[-1]
    if name not in names:
      continue
    value = value[0] if isinstance(value, tuple) else value
    parts = [str(p) for p in path]
    if "blocks" in parts:
      j = int(re.fullmatch(r"layer_(\d+)", parts[parts.index("blocks") + 1]).group(1))
      for b in range(value.shape[0]):
        per_layer.setdefault(b * config.moe_every + j, {})[name] = value[b]
    else:
      i = next(int(m.group(1)) for p in parts if (m := re.fullmatch(r"layers_(\d+)", p)))
      per_layer.setdefault(i, {})[name] = value
  return per_layer


def collect_moe_stats(
  intermediates: Mapping[str, Any], config: ModelConfig, stats: Sequence[str] = MOE_STATS
) -> dict[str, Array]:
  """Gathers sown routing statistics in layer order.

  Returns a dict of arrays with a leading ``[num_moe_layers]`` axis for each of ``stats``:
  ``aux_loss``, ``z_loss``, ``dropped_fraction`` ``[M]`` and ``expert_fraction``,
  ``tokens_per_expert`` ``[M, E]`` by default; ``ROUTING_STATS`` adds ``top1_fraction [M, E]``.
  Works for scanned (``blocks/layer_j``, stacked over blocks) and unscanned (``layers_i``) trees.
  """
  per_layer = values_by_moe_layer(intermediates, config, stats)
  layers = sorted(per_layer)
  return {name: jnp.stack([per_layer[i][name] for i in layers]) for name in stats} if layers else {}


class LanguageModel:
  """Decoder-only (MoE) LM with pure loss/score/logits functions over a params pytree."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.module = Decoder(config)

  # ----------------------------------------------------------------------------- parameters
  def _dummy_batch(self, batch_size: int = 1, length: int = 8) -> dict[str, Array]:
    tokens = jnp.ones((batch_size, length), jnp.int32)
    return {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}

  def init(self, rng: Array, batch_size: int = 1, length: int = 8) -> Any:
    """Boxed params (``nn.LogicallyPartitioned`` leaves carrying logical axis names)."""
    batch = self._dummy_batch(batch_size, length)
    variables = self.module.init({"params": rng}, batch["decoder_input_tokens"], train=False)
    return variables["params"]

  def abstract_params(self) -> Any:
    """Boxed ``jax.ShapeDtypeStruct`` params, computed without allocating memory."""
    return jax.eval_shape(self.init, jax.random.PRNGKey(0))

  def params_logical_axes(self) -> Any:
    """Pytree (same structure as params) of ``PartitionSpec`` of logical axis names."""
    return nn.get_partition_spec(self.abstract_params())

  # ----------------------------------------------------------------------------- forward
  def apply(
    self,
    params: Any,
    batch: Batch,
    *,
    train: bool = False,
    rng: Array | None = None,
    decode: bool = False,
    cache: Any = None,
  ):
    """Runs the decoder; returns ``(logits [b, l, vocab] float32, intermediates, new_cache)``."""
    rngs = {"jitter": rng} if (train and rng is not None) else {}
    variables = {"params": params}
    mutable = ["intermediates"]
    if decode:
      variables["cache"] = cache
      mutable.append("cache")
    logits, state = self.module.apply(
      variables,
      batch["decoder_input_tokens"],
      batch.get("decoder_positions"),
      batch.get("decoder_segment_ids") if not decode else None,
      batch.get("token_mask", None) if decode else token_mask_of(batch),
      train=train,
      decode=decode,
      rngs=rngs,
      mutable=mutable,
    )
    return logits, state.get("intermediates", {}), state.get("cache")

  def logits(self, params: Any, batch: Batch) -> Array:
    """float32 [batch, length, vocab] (eval mode)."""
    return self.apply(params, batch)[0]

  def loss(
    self, params: Any, batch: Batch, *, train: bool = False, rng: Array | None = None
  ) -> tuple[Array, dict[str, Any]]:
    """Total training loss and metrics (see ``loss_from_logits``)."""
    logits, intermediates, _ = self.apply(params, batch, train=train, rng=rng)
    return self.loss_from_logits(logits, intermediates, batch)

  def loss_from_logits(
    self, logits: Array, intermediates: Any, batch: Batch
  ) -> tuple[Array, dict[str, Any]]:
    """Loss from an ``apply`` result, so callers that need the logits (distillation) run once.

    Args:
      logits: float32 [batch, length, vocab].
      intermediates: the ``intermediates`` collection returned by ``apply``.
      batch: the batch the logits were computed on.
    Returns:
      (loss [], metrics) where metrics holds scalars ``loss``, ``cross_entropy``, ``aux_loss``,
      ``z_loss``, ``accuracy``, ``num_tokens`` and, for MoE models, ``moe`` (see
      ``collect_moe_stats``).
    """
    weights = loss_weights_of(batch)
    token_ll = token_log_likelihood(logits, batch["decoder_target_tokens"])
    num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
    cross_entropy = -jnp.sum(token_ll * weights) / num_tokens
    correct = jnp.argmax(logits, axis=-1) == batch["decoder_target_tokens"]
    accuracy = jnp.sum(correct * weights) / num_tokens
    metrics: dict[str, Any] = {
      "cross_entropy": cross_entropy,
      "accuracy": accuracy,
      "num_tokens": jnp.sum(weights),
    }
    total = cross_entropy
    moe = collect_moe_stats(intermediates, self.config)
    if moe:
      aux, z = jnp.mean(moe["aux_loss"]), jnp.mean(moe["z_loss"])
      total = total + self.config.aux_loss_weight * aux + self.config.router_z_loss_weight * z
      metrics.update(aux_loss=aux, z_loss=z, moe=moe)
    else:
      metrics.update(aux_loss=jnp.zeros(()), z_loss=jnp.zeros(()))
    metrics["loss"] = total
    return total, metrics

  def score(self, params: Any, batch: Batch) -> Array:
    """float32 [batch]: sum over weighted target tokens of log p(target | prefix)."""
    logits = self.logits(params, batch)
    token_ll = token_log_likelihood(logits, batch["decoder_target_tokens"])
    return jnp.sum(token_ll * loss_weights_of(batch), axis=-1)


def log_normalizer(logits: Array) -> Array:
  """float32 ``logsumexp`` over the last axis: ``[..., vocab] -> [...]``.

  Written out (max shift with no gradient, then one exp-sum pass) rather than materialising
  ``log_softmax(logits)``: the train step's cross-entropy and the distillation KL need only this
  normaliser, and the ``[batch, length, vocab]`` log-probabilities plus their backward pass were
  about a quarter of the demo model's step time on CPU (benchmarks/distill_step.py).
  """
  logits = logits.astype(jnp.float32)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  return jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1)) + shift[..., 0]


def token_log_likelihood(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target]: logits [b, l, v], targets int [b, l] -> float32 [b, l].

  Computed as ``logits[target] - logsumexp(logits)`` (``log_normalizer``), without the
  ``[b, l, v]`` log-softmax tensor.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - log_normalizer(logits)


def build_model(config: ModelConfig, vocab_size: int | None = None) -> LanguageModel:
  """A LanguageModel whose output size is the vocabulary's (when ``vocab_size`` is given)."""
  if vocab_size is not None and vocab_size != config.vocab_size:
    config = dataclasses.replace(config, vocab_size=vocab_size)
  return LanguageModel(config)
