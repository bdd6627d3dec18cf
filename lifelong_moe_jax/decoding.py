"""Autoregressive decoding and continuation scoring with the KV cache.

Conventions (the same as training, see ``lm.py``): a sequence ``x_1 .. x_n`` is fed to the decoder
as ``[BOS, x_1, .., x_{n-1}]`` with ``BOS = 0`` (the pad id: seqio's ``DecoderFeatureConverter``
shifts targets right with 0), so generation from a prompt feeds ``[BOS, prompt...]`` and reads the
next-token distribution at the last position. Prompts passed here never contain the BOS; id 0 is
padding.

Batching: prompts ``[batch, length]`` may be left-, right- or otherwise padded with 0; they are
left-aligned internally (``left_align``) so every row ends at the same column. Row ``i`` with ``n_i``
real tokens is laid out as ``[pad .., BOS, x_1 .. x_n]`` with positions ``0 .. n_i`` on the real
tokens; padding carries ``token_mask = False``, so its keys are never attended to (attention's
``cached_valid``) and it is not routed to experts.

The whole prompt is written into the cache by one ``decode=True`` call (prefill); then one token per
step in a ``jax.lax.while_loop``, which stops when every row has emitted a stop id (EOS) or after
``max_decode_len`` tokens. Rows that have stopped emit padding (0).

Expert capacity: tokens are routed in groups of ``choose_group_size(batch * length, group_size)``
and an expert holds ``ceil(cf * k * group_size / E)`` slots. A token takes at most one slot per
expert (its k experts are distinct), so at most ``group_size`` tokens reach one expert: a capacity
factor ``cf >= E / k`` makes ``capacity >= group_size`` and no token can be dropped. Decoding and
scoring default to ``no_drop=True``, which raises ``eval_capacity_factor`` to at least ``E / k``
(``no_drop_config``). Without it, which tokens are dropped depends on which other tokens share the
group (the whole prompt during prefill, one token per row during steps), so cached decoding would
not equal a full recomputation, and a sequence's score would depend on the rest of the batch.
Memory: the dispatch tensor is ``[groups, group_size, E, capacity]``, i.e. ``tokens * E *
group_size`` with no-drop capacity; lower ``group_size`` (argument ``group_size``) for large
prefills - results do not change when nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp

from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

Array = jax.Array
PAD_ID = 0
BOS_ID = 0
DEFAULT_EOS_ID = 1
_NEG_INF = -1e10


# --------------------------------------------------------------------------------------- config
def no_drop_config(config: ModelConfig, group_size: int | None = None) -> ModelConfig:
  """``config`` with ``eval_capacity_factor >= num_experts / top_k`` (no token can be dropped).

  Args:
    config: the model's config (dense configs are returned unchanged, except ``group_size``).
    group_size: optional routing group size to use instead of ``config.group_size``.
  """
  changes: dict[str, Any] = {}
  if group_size is not None:
    changes["group_size"] = int(group_size)
  if config.is_moe:
    changes["eval_capacity_factor"] = max(
      config.eval_capacity_factor, config.num_experts / config.top_k
    )
  return dataclasses.replace(config, **changes) if changes else config


def decoding_model(
  model: LanguageModel | ModelConfig, no_drop: bool = True, group_size: int | None = None
) -> LanguageModel:
  """The ``LanguageModel`` used to decode/score: same params, no-drop capacity by default."""
  config = model if isinstance(model, ModelConfig) else model.config
  if no_drop:
    config = no_drop_config(config, group_size)
  elif group_size is not None:
    config = dataclasses.replace(config, group_size=int(group_size))
  return LanguageModel(config)


# --------------------------------------------------------------------------------------- helpers
def left_align(tokens: Array, pad_id: int = PAD_ID) -> tuple[Array, Array]:
  """Moves every row's non-pad tokens to the right end, keeping their order.

  Args:
    tokens: int [batch, length], padded anywhere with ``pad_id``.
  Returns:
    (left-padded tokens int32 [batch, length], lengths int32 [batch]).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = tokens != pad_id
  order = jnp.argsort(mask, axis=1, stable=True)  # pads (False) first, real tokens in order
  return jnp.take_along_axis(tokens, order, axis=1), jnp.sum(mask, axis=1).astype(jnp.int32)


def init_cache(model: LanguageModel, batch_size: int) -> Any:
  """Zero KV cache for ``batch_size`` rows of ``model.config.max_length`` (no memory for params)."""

  def _init():
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    return model.module.init({"params": jax.random.PRNGKey(0)}, tokens, decode=True)["cache"]

  shapes = jax.eval_shape(_init)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def gather_cache_rows(cache: Any, rows: Array) -> Any:
  """Selects batch rows ``rows`` int [n] of every cache leaf (scanned or not); shares cache_index."""

  def take(path, leaf):
    name = _leaf_name(path)
    if name in ("cached_key", "cached_value"):
      return jnp.take(leaf, rows, axis=leaf.ndim - 4)
    if name == "cached_valid":
      return jnp.take(leaf, rows, axis=leaf.ndim - 2)
    return leaf

  return jax.tree_util.tree_map_with_path(take, cache)


def _check_length(config: ModelConfig, needed: int, what: str) -> None:
  if needed > config.max_length:
    raise ValueError(
      f"{what} needs {needed} cache positions (BOS + prompt + new tokens) but ModelConfig.max_length "
      f"is {config.max_length}: shorten the prompt, lower the decode length, or raise max_length."
    )


def _prefill(
  model: LanguageModel, params: Any, prompts: Array, lengths: Array, cache: Any
) -> tuple[Array, Any]:
  """Writes ``[pad.., BOS, prompt]`` into the cache; returns (next-token logits [b, V], cache)."""
  batch, length = prompts.shape
  inputs = jnp.concatenate([jnp.full((batch, 1), BOS_ID, jnp.int32), prompts], axis=1)  # [b, l+1]
  first = (length - lengths)[:, None]  # column of the BOS
  idx = jnp.arange(length + 1)[None, :]
  batch_in = {
    "decoder_input_tokens": inputs,
    "token_mask": idx >= first,
    "decoder_positions": jnp.maximum(idx - first, 0).astype(jnp.int32),
  }
  logits, _, cache = model.apply(params, batch_in, decode=True, cache=cache)
  return logits[:, -1], cache


# --------------------------------------------------------------------------------------- sampling
def sample_logits(
  logits: Array, rng: Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
) -> Array:
  """Draws one token per row.

  Args:
    logits: float [batch, vocab].
    rng: PRNG key (unused when greedy).
    temperature: 0 = greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = all).
  Returns:
    int32 [batch]; the padding id 0 is never drawn (it is not a token the model emits).
  """
  logits = logits.astype(jnp.float32).at[:, PAD_ID].set(_NEG_INF)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, _NEG_INF)
  if top_p < 1.0:
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, _NEG_INF)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen: greedy when ``temperature == 0``."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


@flax.struct.dataclass
class DecodeResult:
  """Output of ``generate``.

  Attributes:
    tokens: int32 [batch, max_decode_len]; the stop id is included, 0 after it.
    lengths: int32 [batch] generated tokens including the stop id.
    scores: float32 [batch] sum of ``log p(token | prefix)`` of the generated tokens under the
      model's own distribution (temperature 1, no filtering): equals ``lm.score`` of
      prompt + generation with loss weights on the generation.
    token_scores: float32 [batch, max_decode_len] the per-token terms (0 after the stop).
  """

  tokens: Array
  lengths: Array
  scores: Array
  token_scores: Array


# --------------------------------------------------------------------------------------- generate
def _generate_impl(
  params: Any,
  prompts: Array,
  rng: Array,
  stops: Array,
  *,
  model: LanguageModel,
  max_decode_len: int,
  sampling: SamplingConfig,
) -> DecodeResult:
  prompts, lengths = left_align(prompts)
  batch = prompts.shape[0]
  cache = init_cache(model, batch)
  logits, cache = _prefill(model, params, prompts, lengths, cache)

  def cond(state):
    step, _, _, _, done, _, _ = state
    return (step < max_decode_len) & ~jnp.all(done)

  def body(state):
    step, cache, logits, out, done, token_scores, rng_ = state
    token = sample_logits(
      logits, jax.random.fold_in(rng_, step), sampling.temperature, sampling.top_k, sampling.top_p
    )
    logp = jnp.take_along_axis(
      jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token[:, None], axis=-1
    )[:, 0]
    token = jnp.where(done, PAD_ID, token)
    token_scores = token_scores.at[:, step].set(jnp.where(done, 0.0, logp))
    out = out.at[:, step].set(token)
    step_in = {
      "decoder_input_tokens": token[:, None],
      "token_mask": ~done[:, None],
      "decoder_positions": (lengths + 1 + step)[:, None],
    }
    done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
    logits, _, cache = model.apply(params, step_in, decode=True, cache=cache)
    return step + 1, cache, logits[:, -1], out, done, token_scores, rng_

  state = (
    jnp.array(0, jnp.int32),
    cache,
    logits,
    jnp.zeros((batch, max_decode_len), jnp.int32),
    jnp.zeros((batch,), bool),
    jnp.zeros((batch, max_decode_len), jnp.float32),
    rng,
  )
  _, _, _, out, _, token_scores, _ = jax.lax.while_loop(cond, body, state)
  real = out != PAD_ID
  lengths_out = jnp.sum(real, axis=1).astype(jnp.int32)
  return DecodeResult(
    tokens=out, lengths=lengths_out, scores=jnp.sum(token_scores, axis=1), token_scores=token_scores
  )


@functools.lru_cache(maxsize=64)
def _generate_fn(config: ModelConfig, max_decode_len: int, sampling: SamplingConfig):
  return jax.jit(
    functools.partial(
      _generate_impl, model=LanguageModel(config), max_decode_len=max_decode_len, sampling=sampling
    )
  )


def generate(
  model: LanguageModel,
  params: Any,
  prompts: Any,
  *,
  max_decode_len: int,
  rng: Array | None = None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  stop_ids: Sequence[int] = (DEFAULT_EOS_ID,),
  no_drop: bool = True,
  group_size: int | None = None,
) -> DecodeResult:
  """Continues every prompt with up to ``max_decode_len`` tokens (jit-compiled, KV cache).

  Args:
    model: the LanguageModel (its config; params are passed separately).
    params: unboxed params (possibly sharded; the computation follows their sharding).
    prompts: int [batch, prompt_length] token ids without BOS, padded with 0 on either side.
      Every row needs ``1 + prompt_length + max_decode_len <= max_length``.
    max_decode_len: most tokens generated per row.
    rng: PRNG key for sampling; step ``t`` uses ``fold_in(rng, t)`` (ignored when greedy).
    temperature / top_k / top_p: see ``sample_logits``.
    stop_ids: a row stops after emitting one of these (default: EOS = 1); () = never stop early.
    no_drop: decode with no-drop expert capacity (see module docstring).
    group_size: routing group size override (memory only; no effect on results when no_drop).
  Returns:
    DecodeResult.
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 2:
    raise ValueError(f"prompts must be int [batch, length], got shape {prompts.shape}.")
  if max_decode_len < 1:
    raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}.")
  dec = decoding_model(model, no_drop, group_size)
  _check_length(dec.config, 1 + prompts.shape[1] + max_decode_len, "generate")
  sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  stops = jnp.asarray([int(s) for s in stop_ids] or [-1], jnp.int32)  # -1 never matches
  return _generate_fn(dec.config, int(max_decode_len), sampling)(params, prompts, rng, stops)


# --------------------------------------------------------------------------------------- scoring
def _score_impl(
  params: Any, prefixes: Array, continuations: Array, prefix_index: Array, *, model: LanguageModel
) -> Array:
  prefixes, lengths = left_align(prefixes)
  cache = init_cache(model, prefixes.shape[0])
  last_logits, cache = _prefill(model, params, prefixes, lengths, cache)
  cache = gather_cache_rows(cache, prefix_index)
  last_logits = jnp.take(last_logits, prefix_index, axis=0)
  lengths = jnp.take(lengths, prefix_index, axis=0)
  mask = continuations != PAD_ID
  steps = jnp.arange(continuations.shape[1])[None, :]
  batch_in = {
    "decoder_input_tokens": continuations,
    "token_mask": mask,
    "decoder_positions": (lengths[:, None] + 1 + steps).astype(jnp.int32),
  }
  logits, _, _ = model.apply(params, batch_in, decode=True, cache=cache)
  # Token j is predicted from the prefix end (j = 0) or from continuation token j - 1.
  logits = jnp.concatenate([last_logits[:, None], logits[:, :-1]], axis=1)  # [B_c, C, V]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_ll = jnp.take_along_axis(logp, continuations[..., None], axis=-1)[..., 0]
  return jnp.where(mask, token_ll, 0.0)


@functools.lru_cache(maxsize=16)
def _score_fn(config: ModelConfig):
  return jax.jit(functools.partial(_score_impl, model=LanguageModel(config)))


def score_continuations(
  model: LanguageModel,
  params: Any,
  prefixes: Any,
  continuations: Any,
  prefix_index: Any | None = None,
  *,
  no_drop: bool = True,
  group_size: int | None = None,
) -> Array:
  """Teacher-forced log-likelihood of continuations, computing each shared prefix once.

  Each prefix is written into the KV cache once (prefill); the cache rows are then gathered for
  the continuations that extend it, which are scored in one more cached call. The result equals
  ``lm.score`` on ``[BOS, prefix, continuation]`` with loss weights on the continuation.

  Args:
    model: the LanguageModel.
    params: unboxed params.
    prefixes: int [num_prefixes, prefix_length] without BOS, padded with 0 on either side
      (a prefix may be empty: then the continuation is scored from BOS alone).
    continuations: int [num_rows, continuation_length], right-padded with 0.
    prefix_index: int [num_rows] which prefix each continuation extends (default: row i -> prefix i).
    no_drop / group_size: as in ``generate``.
  Returns:
    float32 [num_rows, continuation_length] per-token log-likelihoods, 0 on padding.
  """
  prefixes = jnp.asarray(prefixes, jnp.int32)
  continuations = jnp.asarray(continuations, jnp.int32)
  if prefixes.ndim != 2 or continuations.ndim != 2:
    raise ValueError(
      f"prefixes and continuations must be 2-D, got {prefixes.shape} and {continuations.shape}."
    )
  if prefix_index is None:
    if prefixes.shape[0] != continuations.shape[0]:
      raise ValueError(
        "Without prefix_index, prefixes and continuations need the same number of "
        f"rows, got {prefixes.shape[0]} and {continuations.shape[0]}."
      )
    prefix_index = jnp.arange(prefixes.shape[0])
  prefix_index = jnp.asarray(prefix_index, jnp.int32)
  dec = decoding_model(model, no_drop, group_size)
  _check_length(dec.config, 1 + prefixes.shape[1] + continuations.shape[1], "score_continuations")
  return _score_fn(dec.config)(params, prefixes, continuations, prefix_index)
