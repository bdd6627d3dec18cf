"""Trainer unit tests on 8 fake CPU devices with synthetic batches (no input pipeline).

Sharding of params/optimizer state, the extension hooks (regularizers with auxiliary state, the
optimizer wrapper, starting from given params), NaN handling, schedules and metric names.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import param_tree
from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import losses
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import train_state as ts
from lifelong_moe_jax.training import trainer as trainer_lib

CFG = ModelConfig(
  vocab_size=64,
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_experts=8,
  group_size=32,
  train_capacity_factor=2.0,
  max_length=64,
)
LENGTH, BATCH = 16, 8


def _mesh():
  return pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1)))


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(1, CFG.vocab_size, size=(BATCH, LENGTH + 1), dtype=np.int32)
    yield {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32),
    }


def _trainer(**kwargs):
  opt = kwargs.pop("optimizer", None) or optimizers.create_optimizer(
    "adamw", optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0)
  )
  return trainer_lib.Trainer(lm.LanguageModel(kwargs.pop("config", CFG)), _mesh(), opt, **kwargs)


def _shard_shapes(x):
  return {s.data.shape for s in x.addressable_shards}


def _leaf(tree, *names):
  flat = {param_tree.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  hits = [v for k, v in flat.items() if all(n in k.split("/") for n in names)]
  assert hits, f"no leaf with {names} in {list(flat)[:20]}"
  return hits


@pytest.fixture(scope="module")
def adamw_trainer():
  """One compiled AdamW trainer shared by the tests that need no special hooks."""
  return _trainer(seed=1)


def test_params_and_optimizer_state_are_expert_sharded(adamw_trainer):
  trainer = adamw_trainer
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, trainer.global_batch(next(_batches())))
  e_local = CFG.num_experts // 4
  assert _shard_shapes(state.params["layers_1"]["moe"]["wi"]) == {(e_local, 32, 64)}
  moments = [l for l in _leaf(state.opt_state, "moe", "wi") if l.ndim >= 2]
  assert len(moments) == 2  # mu, nu
  for leaf in moments:
    assert _shard_shapes(leaf) == {(e_local, 32, 64)} and leaf.sharding.spec[0] == "expert"
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  assert set(metrics["moe"]) == {"aux_loss", "z_loss", "dropped_fraction", "expert_fraction"}


def test_adafactor_factored_statistics_are_expert_sharded():
  opt = optimizers.create_optimizer(
    "adafactor",
    optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0),
    adafactor_min_dim_size_to_factor=16,
  )
  trainer = _trainer(optimizer=opt)
  shapes = {
    param_tree.path_str(p): (leaf.shape, leaf.sharding)
    for p, leaf in jax.tree_util.tree_flatten_with_path(trainer.abstract_state.opt_state)[0]
  }
  factored = {k: v for k, v in shapes.items() if "moe/wi" in k and len(v[0]) == 2}
  assert sorted(k.split("/")[2] for k in factored) == ["v_col", "v_row"], list(shapes)
  for name, (shape, sharding) in factored.items():
    assert sharding.spec[0] == "expert", name
    assert sharding.shard_shape(shape)[0] == CFG.num_experts // 4, name


class AnchorL2(losses.Regularizer):
  """Test regularizer: weight * ||params - anchor||^2, anchor = params at the start."""

  name = "anchor_l2"

  def __init__(self, weight):
    self.weight = weight

  def init_state(self, ctx):
    return {"anchor": ctx.params}, {"anchor": ctx.params_axes}

  def __call__(self, params, batch, student_logits, aux_state, rng):
    sq = sum(
      jnp.sum(jnp.square(p - a))
      for p, a in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(aux_state["anchor"])
      )
    )
    return self.weight * sq, {"sq_distance": sq, "mean_logit": jnp.mean(student_logits)}


def _freeze_router(tx):
  """Optimizer wrapper: zero updates for every router kernel."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if "router" in param_tree.path_str(p) else "train", params
    )

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def test_regularizer_and_optimizer_wrapper_hooks():
  reg = AnchorL2(weight=10.0)
  trainer = _trainer(regularizers=[reg], optimizer_wrapper=_freeze_router, seed=3)
  start = trainer.restore_or_initialize(None)
  assert start.source == "initialized"
  aux = trainer.init_aux_states(start.state)
  anchor_before = jax.device_get(aux[0]["anchor"])
  router_before = jax.device_get(_leaf(start.state.params, "router")[0])
  # The anchor is sharded like the params (expert axis), not replicated.
  assert _shard_shapes(aux[0]["anchor"]["layers_1"]["moe"]["wi"]) == {(2, 32, 64)}
  batches = _batches()
  state = start.state
  all_metrics = []
  for _ in range(3):
    state, m = trainer.train_step(state, trainer.global_batch(next(batches)), aux)
    all_metrics.append(jax.device_get(m))
  assert all_metrics[0]["reg/anchor_l2/sq_distance"] == 0.0
  assert all_metrics[-1]["reg/anchor_l2/sq_distance"] > 0.0
  last = all_metrics[-1]
  np.testing.assert_allclose(
    last["loss"], last["model_loss"] + last["reg/anchor_l2/loss"], rtol=1e-6
  )
  # The auxiliary state is an input, never updated; the wrapped optimizer froze the router.
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(aux[0]["anchor"]), anchor_before
  )
  np.testing.assert_array_equal(jax.device_get(_leaf(state.params, "router")[0]), router_before)
  assert not np.array_equal(
    jax.device_get(state.params["layers_1"]["moe"]["wi"]), anchor_before["layers_1"]["moe"]["wi"]
  )
  with pytest.raises(ValueError, match="unique"):
    _trainer(regularizers=[reg, AnchorL2(1.0)])


def test_start_from_given_params_and_mismatch_names_params(adamw_trainer):
  trainer = adamw_trainer
  reference = jax.device_get(trainer.init_state())
  params = jax.tree_util.tree_map(lambda x: x + 1.0, reference.params)
  given = ts.TrainState(step=jnp.asarray(7), params=params, opt_state=None, rng=reference.rng)
  start = trainer.restore_or_initialize(None, initial_state=given)
  assert start.source == "initial_state" and int(start.state.step) == 7
  np.testing.assert_array_equal(
    jax.device_get(start.state.params["layers_1"]["moe"]["wi"]), params["layers_1"]["moe"]["wi"]
  )
  assert start.state.params["layers_1"]["moe"]["wi"].sharding.spec[0] == "expert"
  other = _trainer(config=dataclasses.replace(CFG, num_experts=4))
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"params/layers_1/moe/wi"):
    other.state_from_params(params)


def _nan_at_update(index):
  """Optimizer wrapper making the updates of update number ``index`` (0-based) NaN."""

  def wrap(tx):
    def init(params):
      return tx.init(params), jnp.zeros([], jnp.int32)

    def update(grads, state, params=None):
      inner, count = state
      updates, inner = tx.update(grads, inner, params)
      updates = jax.tree_util.tree_map(lambda u: jnp.where(count == index, jnp.nan, u), updates)
      return updates, (inner, count + 1)

    return optax.GradientTransformation(init, update)

  return wrap


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  trainer = _trainer(optimizer_wrapper=_nan_at_update(6))  # params NaN after step 7
  ckpt = checkpoint_manager.Checkpointer(
    str(tmp_path),
    checkpoints.CheckpointConfig(save_interval_steps=5, max_to_keep=None, async_checkpointing=True),
  )
  writer = summaries.MetricsWriter(str(tmp_path / "train"))
  state = trainer.init_state()
  with pytest.raises(trainer_lib.NonFiniteLossError, match="at step 8") as err:
    try:
      trainer.fit(
        state,
        _batches(),
        train_steps=20,
        checkpointer=ckpt,
        writer=writer,
        loop=trainer_lib.LoopConfig(summary_every_steps=100, log_every_steps=100),
        metadata_fn=lambda s, c: {"note": "test"},
      )
    finally:
      ckpt.close()
      writer.close()
  assert err.value.step == 8
  # The message says what is configured (create_optimizer's default clipping is on).
  assert "Gradient clipping is already on (create_optimizer.clip_grad_norm = 1)" in str(err.value)
  assert checkpoint_manager.Checkpointer(str(tmp_path)).all_steps() == [5]
  restored = checkpoints.restore_tree(
    os.path.join(tmp_path, "checkpoints", "5"), trainer.abstract_state
  )
  assert int(restored.step) == 5
  assert all(
    np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(jax.device_get(restored.params))
  )
  assert checkpoints.read_metadata(str(tmp_path))["note"] == "test"


def test_fit_logs_every_step_and_is_deterministic(adamw_trainer, tmp_path):
  def run(steps, subdir):
    trainer = adamw_trainer
    writer = summaries.MetricsWriter(str(tmp_path / subdir))
    state = trainer.fit(
      trainer.init_state(),
      _batches(),
      train_steps=steps,
      writer=writer,
      loop=trainer_lib.LoopConfig(summary_every_steps=1, log_every_steps=2),
    )
    writer.close()
    return state, summaries.read_jsonl(str(tmp_path / subdir / "metrics.jsonl"))

  state_a, log_a = run(4, "a")
  state_b, log_b = run(4, "b")
  assert [r["step"] for r in log_a] == [1, 2, 3, 4]
  assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(state_a.params), jax.device_get(state_b.params)
  )
  names = set(log_a[0])
  for name in (
    "loss",
    "cross_entropy",
    "aux_loss",
    "z_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "step_time",
    "moe/layer_1/expert_7_fraction",
    "moe/layer_1/dropped_fraction",
  ):
    assert name in names, name
  fractions = [log_a[0][f"moe/layer_1/expert_{e}_fraction"] for e in range(CFG.num_experts)]
  assert abs(sum(fractions) - 1.0) < 1e-5


def test_learning_rate_schedules_and_optimizer_errors():
  rsqrt = optimizers.learning_rate_schedule("rsqrt", 1e-2, warmup_steps=100)
  assert float(rsqrt(50)) == pytest.approx(5e-3)
  assert float(rsqrt(100)) == pytest.approx(1e-2)
  assert float(rsqrt(400)) == pytest.approx(5e-3)
  cosine = optimizers.learning_rate_schedule("cosine", 1e-2, warmup_steps=10, train_steps=110)
  assert float(cosine(10)) == pytest.approx(1e-2)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-9)
  constant = optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0)
  assert float(constant(1000)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="decay_steps"):
    optimizers.learning_rate_schedule("cosine", 1e-2, warmup_steps=10)
  with pytest.raises(ValueError, match="kind"):
    optimizers.learning_rate_schedule("linear")
  with pytest.raises(ValueError, match="adafactor"):
    optimizers.create_optimizer("sgd", constant)


def test_progress_line_and_metric_flattening():
  line = summaries.progress_line(
    100, 1000, {"loss": 2.5, "tokens_per_second": 12345.0, "step_time": 0.5}
  )
  assert line == "step 100/1000 | loss 2.5000 | 12,345 tokens/s | 0.500 s/step | ETA 7m30s"
  flat = summaries.flatten_step_metrics(
    {
      "loss": np.float32(1.0),
      "moe": {
        "expert_fraction": np.array([[0.25, 0.75]]),
        "dropped_fraction": np.array([0.1]),
        "aux_loss": np.array([1.0]),
        "z_loss": np.array([2.0]),
      },
    },
    [3],
  )
  assert flat["moe/layer_3/expert_1_fraction"] == 0.75
  assert flat["moe/layer_3/dropped_fraction"] == pytest.approx(0.1)
  assert summaries.first_non_finite([(1, {"loss": 1.0}), (2, {"loss": float("inf")})]) == (
    2,
    "loss",
    float("inf"),
  )
