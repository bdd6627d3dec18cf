r"""Can a router tell the distributions apart? Linear probes on the router inputs of a checkpoint.

  python benchmarks/router_separability.py \
      --checkpoint runs/study/shared/phase_0_wiki_en --data_dir ./data_study \
      --tasks lifelong_wiki_en,lifelong_fortunes_intl,lifelong_dialog_en \
      [--batches 8] [--eval_batch 16] [--length 128] [--probe_steps 300] [--json out.json]

A router logit is linear in the router input (the MoE layer's normalised input), so how well *any*
router can send one distribution's tokens to new experts while keeping another's on the old ones is
bounded by how linearly separable the two distributions' router inputs are, token by token. For a
trained checkpoint (model config from its metadata) this collects the router inputs of every MoE
layer on ``--batches`` packed train batches (probe training) and validation batches (probe
evaluation) of every ``--tasks`` distribution and prints, per MoE layer and pair (a, b):

* the balanced validation accuracy of a logistic-regression probe trained on both (50% = chance);
* the share of b's validation tokens the probe sends to "b" when its threshold lets through 5% /
  10% of a's: what a router with old-data labels could give new experts at 5% / 10% drift (the
  issue's routing claim asks for at least 50% at most 10%);
* the share of b's router-input energy outside the span of a's top principal directions holding
  90% / 99% of a's energy: how much room an update restricted to directions unused by a has.

The probe sees labels of both distributions, which a method without old data does not have: the
numbers are an upper bound for a linear router on these features, not what training reaches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.layers import routing
from lifelong_moe_jax.models import lm

INPUTS = "probe_router_inputs"


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="step dir or run dir (latest step)")
  p.add_argument("--data_dir", default=None, help="prepared data dir (default: the usual one)")
  p.add_argument("--tasks", required=True, help="comma-separated distributions (at least 2)")
  p.add_argument("--batches", type=int, default=8, help="batches per distribution and split")
  p.add_argument("--eval_batch", type=int, default=16)
  p.add_argument("--length", type=int, default=128, help="targets length of the batches")
  p.add_argument("--probe_steps", type=int, default=300, help="Adam steps of each probe")
  p.add_argument("--json", default=None, help="also write the table as JSON here")
  return p.parse_args()


def _capture_inputs(next_fun, args, kwargs, context):
  out = next_fun(*args, **kwargs)
  if isinstance(context.module, routing.TopKRouter) and context.method_name == "__call__":
    context.module.sow("intermediates", INPUTS, args[0].astype(jnp.float32))
  return out


def router_inputs(model: lm.LanguageModel, params, batch) -> tuple[jax.Array, jax.Array]:
  """``([M, G, S, embed] router inputs, [batch, length] token mask)`` in eval mode."""
  with nn.intercept_methods(_capture_inputs):
    _, intermediates, _ = model.apply(params, batch)
  per_layer = lm.values_by_moe_layer(intermediates, model.config, (INPUTS,))
  return jnp.stack([per_layer[m][INPUTS] for m in sorted(per_layer)]), lm.token_mask_of(batch)


def probe(
  xa: np.ndarray, xb: np.ndarray, xa_val: np.ndarray, xb_val: np.ndarray, steps: int
) -> dict[str, float]:
  """Logistic regression a (0) vs b (1) on standardised inputs, class-balanced, L2 1e-4.

  Args:
    xa, xb: ``[tokens, embed]`` training inputs; xa_val, xb_val: validation inputs.
  Returns:
    ``balanced_accuracy`` and ``b_share_at_a_5pct`` / ``b_share_at_a_10pct`` on validation.
  """
  x = np.concatenate([xa, xb])
  y = np.r_[np.zeros(len(xa)), np.ones(len(xb))]
  mu, sd = x.mean(0), x.std(0) + 1e-6
  x = jnp.asarray((x - mu) / sd)
  weight = jnp.asarray(np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean())))
  y = jnp.asarray(y)

  def loss(wb):
    z = x @ wb[0] + wb[1]
    return jnp.mean(weight * (jnp.logaddexp(0.0, z) - y * z)) + 1e-4 * jnp.sum(wb[0] ** 2)

  opt = optax.adam(0.05)
  wb = (jnp.zeros(x.shape[1]), jnp.zeros(()))
  state = opt.init(wb)

  @jax.jit
  def step(wb, state):
    grads = jax.grad(loss)(wb)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(wb, updates), state

  for _ in range(steps):
    wb, state = step(wb, state)
  w, b = np.asarray(wb[0]), float(wb[1])
  sa = ((xa_val - mu) / sd) @ w + b
  sb = ((xb_val - mu) / sd) @ w + b
  out = {"balanced_accuracy": 0.5 * (float((sa <= 0).mean()) + float((sb > 0).mean()))}
  for pct in (5, 10):
    out[f"b_share_at_a_{pct}pct"] = float((sb > np.quantile(sa, 1 - pct / 100)).mean())
  return out


def energy_outside(xa: np.ndarray, xb: np.ndarray, fraction: float) -> tuple[int, float]:
  """``(rank, share)``: the rank of a's principal subspace holding ``fraction`` of its energy
  (uncentered), and the share of b's energy outside it."""
  values, vectors = np.linalg.eigh(xa.T @ xa / len(xa))
  values, vectors = values[::-1], vectors[:, ::-1]
  rank = int(np.searchsorted(np.cumsum(values) / values.sum(), fraction)) + 1
  basis = vectors[:, :rank]
  rest = xb - (xb @ basis) @ basis.T
  return rank, float((rest**2).sum() / (xb**2).sum())


def collect(model, params, partitioner, task, split, args) -> np.ndarray:
  """float32 ``[M, tokens, embed]``: router inputs of the real tokens of ``args.batches`` batches."""
  evaluator = loss_eval.Evaluator(
    model, partitioner, (), {"targets": args.length}, args.eval_batch, data_dir=args.data_dir
  )
  step = jax.jit(lambda p, b: router_inputs(model, p, b))
  iterator, _ = evaluator._dataset(task, split)  # pylint: disable=protected-access
  parts = []
  for local in itertools.islice(iterator, args.batches):
    with partitioner.context():
      x, mask = step(params, {k: jnp.asarray(v) for k, v in local.items()})
    x = np.asarray(x).reshape(x.shape[0], -1, x.shape[-1])
    parts.append(x[:, np.asarray(mask).reshape(-1) > 0])
  if not parts:
    raise SystemExit(f"{task!r} has no {split} batch of {args.eval_batch} sequences.")
  return np.concatenate(parts, axis=1)


def main() -> None:
  args = parse_args()
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if len(tasks) < 2:
    raise SystemExit("--tasks: give at least two distributions to compare.")
  gin_utils.import_task_modules(["tasks"])
  loaded = checkpoints.load_checkpoint(
    args.checkpoint, mesh_config=partitioning.MeshConfig(), data_dir=args.data_dir
  )
  model, params, partitioner = loaded.model, loaded.params, loaded.partitioner
  if not model.config.is_moe:
    raise SystemExit(f"{loaded.step_dir} holds a dense model: it has no router.")
  inputs = {
    (task, split): collect(model, params, partitioner, task, split, args)
    for task in tasks
    for split in ("train", "validation")
  }
  print(
    f"router inputs of {loaded.step_dir} ({model.config.num_experts} experts), "
    f"{args.batches} batches of {args.eval_batch} x {args.length} per distribution and split"
  )
  print(
    "| MoE layer | a | b | probe balanced acc | b flagged at 5% / 10% of a | "
    "b energy outside a's 90% / 99% subspace (rank) |"
  )
  print("|---|---|---|---|---|---|")
  rows = []
  for layer in range(inputs[tasks[0], "train"].shape[0]):
    for a, b in itertools.combinations(tasks, 2):
      row = probe(
        inputs[a, "train"][layer],
        inputs[b, "train"][layer],
        inputs[a, "validation"][layer],
        inputs[b, "validation"][layer],
        args.probe_steps,
      )
      for fraction in (0.9, 0.99):
        rank, share = energy_outside(
          inputs[a, "train"][layer], inputs[b, "validation"][layer], fraction
        )
        row[f"b_energy_outside_a_{round(fraction * 100)}"] = share
        row[f"a_rank_{round(fraction * 100)}"] = rank
      rows.append(dict(row, layer=layer, a=a, b=b))
      print(
        f"| {layer} | {a} | {b} | {row['balanced_accuracy']:.1%} | "
        f"{row['b_share_at_a_5pct']:.1%} / {row['b_share_at_a_10pct']:.1%} | "
        f"{row['b_energy_outside_a_90']:.1%} ({row['a_rank_90']}) / "
        f"{row['b_energy_outside_a_99']:.1%} ({row['a_rank_99']}) |"
      )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"checkpoint": loaded.step_dir, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
