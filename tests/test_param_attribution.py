"""Forgetting attribution: param groups restored to an earlier checkpoint's values, exactly."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from lifelong_moe_jax.eval import param_attribution
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel
from lifelong_moe_jax.param_tree import ParamTreeError, path_str

CFG = ModelConfig(
  vocab_size=32,
  embed_dim=16,
  num_layers=4,
  num_heads=2,
  head_dim=8,
  mlp_dim=16,
  num_experts=2,
  top_k=2,
  group_size=16,
)


def _params(config, seed):
  model = LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed)))
  return jax.tree_util.tree_map(np.asarray, params), model.params_logical_axes()


def _by_path(tree):
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scanned", [False, True])
def test_groups_cover_every_leaf_by_name(scanned):
  params, axes = _params(dataclasses.replace(CFG, scan_layers=scanned), 0)
  sizes = param_attribution.group_sizes(params, axes)
  assert sum(sizes.values()) == sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert all(sizes[g] > 0 for g in param_attribution.PARAM_GROUPS), sizes
  # The embedding table alone is the embed group; the output projection the logits group.
  assert sizes["embed"] == CFG.vocab_size * CFG.embed_dim
  assert sizes["logits"] == CFG.vocab_size * CFG.embed_dim
  assert sizes["norms"] == (2 * CFG.num_layers + 1) * CFG.embed_dim


def test_restoring_a_group_takes_exactly_the_reference_leaves_of_that_group():
  trained, axes = _params(CFG, 1)
  reference, _ = _params(CFG, 2)
  out = _by_path(param_attribution.restore_groups(trained, reference, axes, ["attention", "norms"]))
  ref, own = _by_path(reference), _by_path(trained)
  for key, value in out.items():
    from_reference = "attention" in key or "norm" in key
    expected = ref[key] if from_reference else own[key]
    np.testing.assert_array_equal(value, expected, err_msg=key)
  # Everything restored gives the reference back when no expert was added.
  everything = param_attribution.restore_groups(
    trained, reference, axes, param_attribution.PARAM_GROUPS
  )
  for a, b in zip(jax.tree_util.tree_leaves(everything), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(a, b)


def test_old_experts_restores_the_reference_slices_and_keeps_the_added_experts():
  reference, _ = _params(CFG, 3)
  trained, axes = _params(dataclasses.replace(CFG, num_experts=3), 4)
  out = _by_path(param_attribution.restore_groups(trained, reference, axes, ["old_experts"]))
  ref, own = _by_path(reference), _by_path(trained)
  for key, value in out.items():
    if key.endswith("router/kernel"):  # [embed, expert]
      np.testing.assert_array_equal(value[:, :2], ref[key])
      np.testing.assert_array_equal(value[:, 2:], own[key][:, 2:])
    elif "moe" in key:  # [expert, ...]
      np.testing.assert_array_equal(value[:2], ref[key])
      np.testing.assert_array_equal(value[2:], own[key][2:])
    else:
      np.testing.assert_array_equal(value, own[key], err_msg=key)


def test_incompatible_references_are_refused_before_any_work():
  trained, axes = _params(CFG, 0)
  wider, _ = _params(dataclasses.replace(CFG, num_experts=3), 0)
  with pytest.raises(ParamTreeError, match="pass the earlier checkpoint as the reference"):
    param_attribution.restore_groups(trained, wider, axes, ["embed"])
  other, _ = _params(dataclasses.replace(CFG, embed_dim=8, head_dim=4), 0)
  with pytest.raises(ParamTreeError, match="not checkpoints of the same model"):
    param_attribution.restore_groups(trained, other, axes, ["embed"])
  deeper, _ = _params(dataclasses.replace(CFG, num_layers=6), 0)
  with pytest.raises(ParamTreeError, match="structure"):
    param_attribution.restore_groups(trained, deeper, axes, ["embed"])
  with pytest.raises(ValueError, match="Unknown param groups"):
    param_attribution.restore_groups(trained, trained, axes, ["experts"])
