"""KV-cache decoding: cached == full recomputation, scores == teacher-forced log-likelihood."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax import decoding
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

# eval_capacity_factor=0.5 would drop tokens; decoding must raise it (no_drop) to stay exact.
CFG = ModelConfig(
  vocab_size=48,
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=48,
  num_experts=4,
  top_k=2,
  group_size=8,
  eval_capacity_factor=0.5,
  max_length=40,
)
# Prompts padded on the left, on the right, and not at all; lengths 3, 5, 7.
PROMPTS = np.array(
  [[0, 0, 0, 0, 5, 9, 11], [7, 3, 8, 2, 9, 0, 0], [4, 4, 6, 10, 12, 14, 3]], np.int32
)


@pytest.fixture(scope="module")
def model_and_params():
  model = LanguageModel(CFG)
  return model, init_params(model, 0)


def init_params(model, seed):
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed)))


def uncached_generate(model, params, prompts, steps, rng, sampling, stop_ids):
  """Reference: recomputes the whole (left-aligned) prefix without a cache at every step.

  The sequence buffer has a fixed width (one compilation); columns not generated yet are padding
  that causal attention never lets the current position see.
  """
  ref = decoding.decoding_model(model)
  left, lengths = decoding.left_align(jnp.asarray(prompts))
  batch, plen = left.shape
  width = 1 + plen + steps
  seq = jnp.zeros((batch, width), jnp.int32).at[:, 1 : plen + 1].set(left)
  first = (plen - lengths)[:, None]
  idx = jnp.arange(width)[None, :]
  positions = jnp.maximum(idx - first, 0).astype(jnp.int32)

  @jax.jit
  def last_logits(seq, end):
    segments = ((idx >= first) & (idx < end)).astype(jnp.int32)
    batch_in = {
      "decoder_input_tokens": seq,
      "decoder_target_tokens": seq,
      "decoder_segment_ids": segments,
      "decoder_positions": positions,
    }
    return jax.lax.dynamic_index_in_dim(
      ref.logits(params, batch_in), end - 1, axis=1, keepdims=False
    )

  done = jnp.zeros((batch,), bool)
  out = []
  for t in range(steps):
    end = plen + 1 + t
    tok = decoding.sample_logits(
      last_logits(seq, end),
      jax.random.fold_in(rng, t),
      sampling.temperature,
      sampling.top_k,
      sampling.top_p,
    )
    tok = jnp.where(done, 0, tok)
    out.append(np.asarray(tok))
    seq = seq.at[:, end].set(tok)
    done = done | jnp.isin(tok, jnp.asarray(stop_ids, jnp.int32))
  return np.stack(out, axis=1)


def teacher_forced_scores(model, params, prompts, generated):
  """lm.score of [BOS, prompt, generation[:-1]] -> [prompt, generation], weights on the generation.

  Rows are unpadded sequences, right-padded to one width (padding has weight 0 and comes last).
  """
  rows = []
  for prompt, gen in zip(np.asarray(prompts), np.asarray(generated)):
    p, g = prompt[prompt != 0], gen[gen != 0]
    rows.append((np.concatenate([p, g]), np.concatenate([np.zeros(len(p)), np.ones(len(g))])))
  width = max(len(t) for t, _ in rows)
  targets = np.zeros((len(rows), width), np.int32)
  weights = np.zeros((len(rows), width), np.float32)
  for i, (t, w) in enumerate(rows):
    targets[i, : len(t)], weights[i, : len(t)] = t, w
  inputs = np.concatenate([np.zeros((len(rows), 1), np.int32), targets[:, :-1]], axis=1)
  batch = {
    "decoder_input_tokens": inputs,
    "decoder_target_tokens": targets,
    "decoder_loss_weights": weights,
  }
  return np.asarray(jax.jit(model.score)(params, batch))


@pytest.mark.parametrize(
  "sampling",
  [decoding.SamplingConfig(), decoding.SamplingConfig(temperature=0.8, top_k=10, top_p=0.9)],
  ids=["greedy", "sampled"],
)
def test_cached_decoding_equals_full_recomputation(model_and_params, sampling):
  model, params = model_and_params
  rng = jax.random.PRNGKey(3)
  steps = 12
  result = decoding.generate(
    model,
    params,
    PROMPTS,
    max_decode_len=steps,
    rng=rng,
    temperature=sampling.temperature,
    top_k=sampling.top_k,
    top_p=sampling.top_p,
    stop_ids=(),
  )
  expected = uncached_generate(model, params, PROMPTS, steps, rng, sampling, ())
  np.testing.assert_array_equal(np.asarray(result.tokens), expected)
  assert np.all(np.asarray(result.lengths) == steps)
  # Scores are the teacher-forced log-likelihood of the training path (no-drop capacity).
  tf = teacher_forced_scores(decoding.decoding_model(model), params, PROMPTS, result.tokens)
  np.testing.assert_allclose(np.asarray(result.scores), tf, rtol=1e-4, atol=1e-4)


def test_stop_id_ends_each_row_and_pads_after_it(model_and_params):
  model, params = model_and_params
  free = decoding.generate(model, params, PROMPTS, max_decode_len=12, stop_ids=())
  toks = np.asarray(free.tokens)
  stop = int(toks[0, 2])  # the third token of row 0 becomes the stop id
  first_stop = int(np.flatnonzero(toks[0] == stop)[0])
  result = decoding.generate(model, params, PROMPTS, max_decode_len=12, stop_ids=(stop,))
  out = np.asarray(result.tokens)
  for row, full in zip(out, toks):
    hits = np.flatnonzero(full == stop)
    if hits.size:
      end = hits[0] + 1
      np.testing.assert_array_equal(row[:end], full[:end])
      assert np.all(row[end:] == 0)
    else:
      np.testing.assert_array_equal(row, full)
  assert int(result.lengths[0]) == first_stop + 1
  np.testing.assert_allclose(
    np.asarray(result.scores),
    teacher_forced_scores(decoding.decoding_model(model), params, PROMPTS, out),
    rtol=1e-4,
    atol=1e-4,
  )


def test_padding_layout_does_not_change_the_continuation(model_and_params):
  model, params = model_and_params
  prompts = np.array(
    [
      [5, 9, 11, 8, 0, 0, 0],  # right padding
      [0, 0, 0, 5, 9, 11, 8],  # left padding
      [0, 5, 0, 9, 11, 0, 8],
    ],  # padding anywhere
    np.int32,
  )
  out = np.asarray(decoding.generate(model, params, prompts, max_decode_len=12, stop_ids=()).tokens)
  np.testing.assert_array_equal(out[1], out[0])
  np.testing.assert_array_equal(out[2], out[0])


def test_no_drop_config_makes_capacity_cover_the_group():
  cfg = decoding.no_drop_config(CFG)
  assert cfg.eval_capacity_factor == CFG.num_experts / CFG.top_k
  from lifelong_moe_jax.layers.routing import expert_capacity

  assert (
    expert_capacity(cfg.group_size, cfg.num_experts, cfg.top_k, cfg.eval_capacity_factor)
    >= cfg.group_size
  )
  dense = dataclasses.replace(CFG, num_experts=0)
  assert decoding.no_drop_config(dense) == dense


def test_score_continuations_equals_teacher_forced_score():
  # Scanned layers (cache leaves with a leading layer axis); the unscanned path is checked against
  # exact values in test_fewshot.py and against lm.score in test_infer.py.
  model = LanguageModel(dataclasses.replace(CFG, scan_layers=True))
  params = init_params(model, 1)
  prefixes = np.array([[3, 4, 5, 6, 0], [0, 0, 9, 8, 7]], np.int32)
  conts = np.array([[10, 11, 0], [12, 0, 0], [13, 14, 15], [16, 17, 0]], np.int32)
  index = np.array([0, 0, 1, 1])
  token_ll = decoding.score_continuations(model, params, prefixes, conts, index)
  assert token_ll.shape == conts.shape
  got = np.asarray(jnp.sum(token_ll, axis=1))
  ref = decoding.decoding_model(model)
  expected = teacher_forced_scores(ref, params, prefixes[index], conts)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.0, 0.5, 0.3, 0.15, 0.05]]) + 1e-12)
  keys = jax.random.split(jax.random.PRNGKey(0), 200)

  def draw(**kw):
    fn = jax.jit(jax.vmap(lambda k: decoding.sample_logits(logits, k, temperature=1.0, **kw)[0]))
    return set(np.asarray(fn(keys)).tolist())

  assert draw(top_k=2) == {1, 2}
  assert draw(top_p=0.7) == {1, 2}  # 0.5 < 0.7 needs the second token too
  assert draw(top_p=0.4) == {1}
  assert 0 not in draw()  # padding is never drawn
  assert int(decoding.sample_logits(logits, keys[0])[0]) == 1  # greedy


def test_too_long_request_is_a_clear_error(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="max_length is 40"):
    decoding.generate(model, params, PROMPTS, max_decode_len=40)
