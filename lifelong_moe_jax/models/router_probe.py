"""Router logits and router inputs of every MoE layer, captured without changing the layers.

``capture_router()`` is a context manager around ``LanguageModel.apply`` (inside or outside
``jax.jit``): a flax method interceptor (``nn.intercept_methods``) runs after every
``TopKRouter.__call__`` and sows into the ``intermediates`` collection, next to the router module's
own statistics,

* ``router_logits`` float32 ``[G, S, E]``: ``x @ kernel`` of the router's input groups ``x``
  (``[G, S, embed]``, the MoE layer's input regrouped; ``G * S = batch * length`` in token order), and
* ``router_input_sum`` float32 ``[embed]``, ``router_input_gram`` float32 ``[embed, embed]`` and
  ``router_token_count`` float32 ``[]``: the sum of the router inputs over real (``token_mask``)
  tokens, the sum of their outer products ``x x^T``, and their number.

* ``router_inputs`` float32 ``[G, S, embed]`` (``token_inputs=True``): the router inputs themselves.

The logits are recomputed from the router's (unjittered) input and kernel, so in training with
``router_jitter > 0`` they are the jitter-free logits; the routing itself is unchanged.
``collect_router_stats`` stacks them per MoE layer in ``lm.collect_moe_stats``'s layer order (scanned
blocks: one row per block). Used by router-level distillation, the new-expert load balance and the
``copy_offset`` router-column initialisation (mean router input on the new data).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lifelong_moe_jax.layers import routing
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

Array = jax.Array
ROUTER_LOGITS = "router_logits"
ROUTER_INPUT_SUM = "router_input_sum"
ROUTER_TOKEN_COUNT = "router_token_count"
ROUTER_INPUT_GRAM = "router_input_gram"
ROUTER_INPUTS = "router_inputs"
ROUTER_STATS = (
  ROUTER_LOGITS,
  ROUTER_INPUT_SUM,
  ROUTER_INPUT_GRAM,
  ROUTER_TOKEN_COUNT,
  ROUTER_INPUTS,
)


def _interceptor(logits: bool, inputs: bool, token_inputs: bool):
  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if not (isinstance(module, routing.TopKRouter) and context.method_name == "__call__"):
      return out
    x = args[0].astype(jnp.float32)  # [G, S, embed]
    if logits:
      kernel = module.get_variable("params", "kernel")
      module.sow("intermediates", ROUTER_LOGITS, jnp.einsum("gsd,de->gse", x, kernel))
    if token_inputs:
      module.sow("intermediates", ROUTER_INPUTS, x)
    if inputs:
      mask = kwargs.get("token_mask")
      weights = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
      module.sow("intermediates", ROUTER_INPUT_SUM, jnp.einsum("gsd,gs->d", x, weights))
      module.sow("intermediates", ROUTER_INPUT_GRAM, jnp.einsum("gsd,gse,gs->de", x, x, weights))
      module.sow("intermediates", ROUTER_TOKEN_COUNT, jnp.sum(weights))
    return out

  return intercept


@contextlib.contextmanager
def capture_router(
  *, logits: bool = True, inputs: bool = False, token_inputs: bool = False
) -> Iterator[None]:
  """Within this context, model applies also sow router logits and/or router-input sums.

  Args:
    logits: sow ``router_logits`` ``[G, S, E]`` per MoE layer.
    inputs: sow ``router_input_sum`` ``[embed]``, ``router_input_gram`` ``[embed, embed]`` and
      ``router_token_count`` ``[]`` per MoE layer.
    token_inputs: sow ``router_inputs`` ``[G, S, embed]`` per MoE layer.
  """
  with nn.intercept_methods(_interceptor(logits, inputs, token_inputs)):
    yield


def collect_router_stats(intermediates: Mapping[str, Any], config: ModelConfig) -> dict[str, Array]:
  """``{name: [num_moe_layers, ...]}`` of the captured router statistics (absent names omitted).

  Layer order is ``lm.collect_moe_stats``'s: unscanned ``layers_<i>`` by ``i``; scanned
  ``blocks/layer_<j>`` row ``b`` is layer ``b * moe_every + j``.
  """
  per_layer = lm.values_by_moe_layer(intermediates, config, ROUTER_STATS)
  layers = sorted(per_layer)
  present = [n for n in ROUTER_STATS if layers and all(n in per_layer[i] for i in layers)]
  return {n: jnp.stack([per_layer[i][n] for i in layers]) for n in present}
