"""``MethodOptions.project_new_router_updates``: the projection of new router columns' updates
(exact values against NumPy on small trees) and a 2-phase run that keeps the new columns' logits
on the old distribution's mean router input where the expansion put them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import method_options
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import router_projection
from lifelong_moe_jax.models import lm
import tasks  # noqa: F401  (registers the seqio tasks)
from tiny_runner import TWO_PHASES, tiny_runner


def _numpy_projection(u: np.ndarray, means: np.ndarray, first: int) -> np.ndarray:
  """Reference: columns >= first minus their least-squares fit on the means (``[P, embed]``)."""
  out = u.astype(np.float64).copy()
  a = means.T.astype(np.float64)  # [embed, P]
  for e in range(first, u.shape[-1]):
    coef, *_ = np.linalg.lstsq(a, out[:, e], rcond=None)
    out[:, e] = out[:, e] - a @ coef
  return out


def test_orthonormal_bases_span_the_means_and_drop_dependent_ones():
  rng = np.random.default_rng(0)
  means = rng.normal(size=(3, 2, 6))
  means[2, 1] = 2.0 * means[0, 1] - means[1, 1]  # layer 1: the third mean adds no direction
  q = router_projection.orthonormal_bases(means)
  assert q.shape == (2, 6, 3)
  np.testing.assert_allclose(q[0].T @ q[0], np.eye(3), atol=1e-6)
  gram = q[1].T @ q[1]
  np.testing.assert_allclose(np.diag(gram), [1.0, 1.0, 0.0], atol=1e-6)
  for m in range(2):  # every mean is reproduced by its projection on the basis
    for p in range(3):
      mu = means[p, m]
      np.testing.assert_allclose(q[m] @ (q[m].T @ mu), mu, atol=1e-5)
  with pytest.raises(ValueError, match="phases >= 1"):
    router_projection.orthonormal_bases(np.zeros((0, 2, 6)))


def _tree(scanned: bool):
  rng = np.random.default_rng(1)
  if scanned:
    params = {
      "blocks": {"moe": {"router": {"kernel": rng.normal(size=(2, 5, 4)).astype(np.float32)}}},
      "embed": {"embedding": rng.normal(size=(7, 5)).astype(np.float32)},
    }
    axes = {
      "blocks": {"moe": {"router": {"kernel": P("layers", "embed", "expert")}}},
      "embed": {"embedding": P("vocab", "embed")},
    }
  else:
    params = {
      "layers_1": {"moe": {"router": {"kernel": rng.normal(size=(5, 4)).astype(np.float32)}}},
      "layers_3": {"moe": {"router": {"kernel": rng.normal(size=(5, 4)).astype(np.float32)}}},
      "embed": {"embedding": rng.normal(size=(7, 5)).astype(np.float32)},
    }
    axes = {
      "layers_1": {"moe": {"router": {"kernel": P("embed", "expert")}}},
      "layers_3": {"moe": {"router": {"kernel": P("embed", "expert")}}},
      "embed": {"embedding": P("vocab", "embed")},
    }
  return jax.tree_util.tree_map(jnp.asarray, params), axes


@pytest.mark.parametrize("scanned", [False, True])
def test_projected_updates_equal_numpy_and_keep_logits_on_the_means(scanned):
  params, axes = _tree(scanned)
  rng = np.random.default_rng(2)
  means = rng.normal(size=(2, 2, 5))  # 2 earlier distributions, 2 MoE layers, embed 5
  first = 2
  tx = router_projection.with_router_projection(
    optax.sgd(0.5), params, axes, router_projection.orthonormal_bases(means), first
  )
  grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  plain, _ = optax.sgd(0.5).update(grads, optax.sgd(0.5).init(params))
  np.testing.assert_array_equal(updates["embed"]["embedding"], plain["embed"]["embedding"])
  if scanned:
    kernels = [(updates["blocks"]["moe"]["router"]["kernel"][m], m) for m in range(2)]
    raw = [plain["blocks"]["moe"]["router"]["kernel"][m] for m in range(2)]
  else:
    kernels = [(updates[f"layers_{n}"]["moe"]["router"]["kernel"], m) for m, n in enumerate((1, 3))]
    raw = [plain[f"layers_{n}"]["moe"]["router"]["kernel"] for n in (1, 3)]
  for (u, m), u_raw in zip(kernels, raw):
    u, u_raw = np.asarray(u), np.asarray(u_raw)
    want = _numpy_projection(u_raw, means[:, m], first)
    np.testing.assert_allclose(u, want, atol=1e-5)
    np.testing.assert_array_equal(u[:, :first], u_raw[:, :first])  # old columns untouched
    # The new columns' logits on every earlier mean do not move; other directions do.
    np.testing.assert_allclose(means[:, m] @ u[:, first:], 0.0, atol=1e-5)
    assert np.abs(u[:, first:]).max() > 1e-2


def test_option_is_validated_and_legacy_runs_read_it_as_off():
  with pytest.raises(method_options.MethodError, match="project_new_router_updates"):
    method_options.MethodOptions(project_new_router_updates="yes")
  assert method_options.LEGACY_OPTION_VALUES["project_new_router_updates"] is False
  assert method_options.MethodOptions().project_new_router_updates is False


def _router_columns(params, num_moe: int):
  """``[M, embed, E]`` router kernels in collect_moe_stats order (unscanned tiny model)."""
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  routers = sorted(
    (k for k in flat if "router" in k and k.endswith("kernel")),
    key=lambda k: int(k.split("layers_")[1].split("/")[0]),
  )
  assert len(routers) == num_moe, routers
  return np.stack([flat[k] for k in routers])


def test_two_phase_run_keeps_new_columns_on_the_old_mean(tmp_path, prepared_data_dir):
  runner = tiny_runner(
    str(tmp_path / "run"),
    prepared_data_dir,
    ["lifelong_moe", "expand_only"],
    [*TWO_PHASES, "MethodOptions.project_new_router_updates = True"],
  )
  report = runner.run()
  assert all(m["complete"] for m in report["methods"].values())
  partitioner = partitioning.Partitioner(
    partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
  )
  for method in ("lifelong_moe", "expand_only"):
    pdir = runner.phase_dir(method, 1)
    means = router_projection.load_means(pdir)
    config = runner.config_for(method, 1)
    model = lm.LanguageModel(config)
    num_moe = config.num_moe_layers
    assert means.shape == (1, num_moe, config.embed_dim)
    start = _router_columns(
      checkpoints.restore_model_params(os.path.join(pdir, "checkpoints", "4"), model, partitioner),
      num_moe,
    )
    end = _router_columns(
      checkpoints.restore_model_params(runner.layout.final_step_dir(method, 1), model, partitioner),
      num_moe,
    )
    first = config.num_experts - 2
    moved = end[..., first:] - start[..., first:]
    assert np.abs(moved).max() > 1e-4, method  # the new columns trained
    for m in range(num_moe):  # ... but not along the old distribution's mean router input:
      # cosine(mu, movement of each new column) ~ float32 rounding (random directions: ~0.25).
      mu = means[0, m]
      cos = (mu @ moved[m]) / (np.linalg.norm(mu) * np.linalg.norm(moved[m], axis=0))
      assert np.abs(cos).max() < 1e-4, (method, m, cos)
    if method == "expand_only":  # nothing frozen: old columns train freely
      assert np.abs(end[..., :first] - start[..., :first]).max() > 1e-4
    with open(os.path.join(pdir, phase_results.RESULT_FILE)) as f:
      assert json.load(f)["options"]["project_new_router_updates"] is True


def _setup(phase_dir, options):
  from lifelong_moe_jax.lifelong import methods as methods_lib  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong.phase_record import PhaseRecord  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong.schedule import LifelongSchedule  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel

  base = ModelConfig(
    vocab_size=64, embed_dim=8, num_layers=2, num_heads=2, head_dim=4, mlp_dim=16, num_experts=2
  )
  schedule = LifelongSchedule(
    phases=[
      {"name": "a", "mixture": "lifelong_wiki_en", "steps": 2},
      {"name": "b", "mixture": "lifelong_code_py", "steps": 2, "add_experts": 2},
    ]
  )
  record = PhaseRecord.start(
    "a", mixture="lifelong_wiki_en", steps=2, method="shared", num_experts=2
  ).append_phase(
    "b", mixture="lifelong_code_py", steps=2, method="lifelong_moe", add_experts=2, init="copy"
  )
  return methods_lib.PhaseSetup(
    schedule=schedule,
    index=1,
    options=options,
    base_config=base,
    partitioner=partitioning.Partitioner(
      partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
    ),
    data_dir=None,
    phase_dir=str(phase_dir),
    previous_phase_dir="/unused",
    previous_params=lambda: {},
    record=record,
  )


def test_optimizer_wrapper_freezes_then_projects_and_refuses_a_start_without_means(tmp_path):
  from lifelong_moe_jax.lifelong import methods as methods_lib  # pylint: disable=import-outside-toplevel

  options = method_options.MethodOptions(project_new_router_updates=True)
  method = methods_lib.get_method("lifelong_moe")
  with pytest.raises(method_options.MethodError, match="old_router_means.npy"):
    method.optimizer_wrapper(_setup(tmp_path, options))
  rng = np.random.default_rng(3)
  means = rng.normal(size=(1, 1, 8))  # one earlier distribution, one MoE layer, embed 8
  router_projection.save_means(str(tmp_path), means)
  setup = _setup(tmp_path, options)
  tx = method.optimizer_wrapper(setup)(optax.sgd(1.0))
  model = lm.LanguageModel(method.model_config(setup.base_config, setup.schedule, 1, options))
  params = jax.tree_util.tree_map(jnp.asarray, model.init(jax.random.PRNGKey(0)))
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  params = nn.unbox(params)
  grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  (router,) = [
    np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(updates)[0]
    if "router" in jax.tree_util.keystr(path)
  ]
  np.testing.assert_array_equal(router[:, :2], 0.0)  # old columns frozen
  np.testing.assert_allclose(means[0, 0] @ router[:, 2:], 0.0, atol=1e-5)  # new ones projected
  np.testing.assert_allclose(
    router[:, 2:], _numpy_projection(-np.ones((8, 4)), means[:, 0], 2)[:, 2:], atol=1e-5
  )
  # Without the option (or for a method that adds no experts) only freezing remains.
  plain = method.optimizer_wrapper(_setup(tmp_path, method_options.MethodOptions()))
  assert plain is not None
  assert methods_lib.get_method("finetune").optimizer_wrapper(_setup(tmp_path, options)) is None
