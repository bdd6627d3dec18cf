"""The sharded train/eval steps and the training loop.

    trainer = Trainer(model, partitioner, optimizers.create_optimizer(train_steps=1000),
                      seed=0, regularizers=[...], optimizer_wrapper=freeze_fn)
    start = trainer.restore_or_initialize(checkpointer, initial_state=None,
                                          restore_checkpoint_path=None, restore_mode="params")
    aux = trainer.init_aux_states(start.state)
    state = trainer.fit(start.state, batches, aux_states=aux, train_steps=1000, ...)

Every array lives on the mesh: params and optimizer state are sharded by their logical axes
(expert weights and their moments over the ``expert`` mesh axis), batches over ``('data',
'expert')``. The step is compiled once, ahead of time, with these in/out shardings; the state
argument is donated.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import distributed
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.training import losses
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import train_state as ts

PyTree = Any
Batch = Mapping[str, np.ndarray]


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss, gradient norm or parameter; ``step`` names the step."""

  def __init__(
    self,
    step: int,
    what: str,
    value: float | None = None,
    *,
    clip_grad_norm: float | None = None,
    learning_rate: float | None = None,
  ):
    self.step = step
    detail = f" = {value}" if value is not None else ""
    lr = f"{learning_rate:.3g} at that step; " if learning_rate is not None else ""
    lower_lr = f"lower the learning rate ({lr}learning_rate_schedule.peak_learning_rate)"
    if clip_grad_norm:
      fix = (
        f"Gradient clipping is already on (create_optimizer.clip_grad_norm = "
        f"{clip_grad_norm:g}): {lower_lr} or the clipping threshold, or inspect the data "
        "near this step."
      )
    else:
      fix = (
        "Gradient clipping is off (create_optimizer.clip_grad_norm = None): enable it "
        f"(e.g. 1.0), {lower_lr} or inspect the data near this step."
      )
    super().__init__(
      f"Non-finite {what}{detail} at step {step}. Training stopped; the state after step "
      f"{step} was not saved, so the latest checkpoint is the last good one. {fix}"
    )


@dataclasses.dataclass
class StartPoint:
  """Where training starts from.

  Attributes:
    state: the sharded train state.
    source: "resumed", "initial_state", "restored-params", "restored-full" or "initialized".
    step_dir: the run's own checkpoint resumed from (its data position applies), else None.
    metadata: that checkpoint's metadata ({} unless resumed).
  """

  state: ts.TrainState
  source: str
  step_dir: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How often the loop writes summaries, logs progress and evaluates (0 disables eval)."""

  summary_every_steps: int = 100
  log_every_steps: int = 100
  eval_every_steps: int = 0

  def __post_init__(self):
    if self.summary_every_steps <= 0 or self.log_every_steps <= 0 or self.eval_every_steps < 0:
      raise ValueError(f"Loop intervals must be positive (eval: >= 0), got {self}.")


class Trainer:
  """Sharded train state, jitted train/eval steps and the training loop for one model and mesh.

  Args:
    model: the language model.
    partitioner: mesh + logical axis rules.
    optimizer: optax transformation and schedule (``optimizers.create_optimizer``).
    seed: params init and per-step rng (``fold_in(rng, step)``) derive from it.
    regularizers: extra loss terms (``losses.Regularizer``).
    optimizer_wrapper: ``tx -> tx`` applied to the whole update rule (e.g. freezing masks).
  """

  def __init__(
    self,
    model: lm.LanguageModel,
    partitioner: partitioning.Partitioner,
    optimizer: optimizers.Optimizer,
    *,
    seed: int = 0,
    regularizers: Sequence[losses.Regularizer] = (),
    optimizer_wrapper: optimizers.OptimizerWrapper | None = None,
  ):
    losses.check_regularizer_names(regularizers)
    self.model = model
    self.partitioner = partitioner
    self.optimizer = optimizer.wrapped(optimizer_wrapper)
    self.seed = seed
    self.regularizers = tuple(regularizers)
    self.model_config_dict = dataclasses.asdict(model.config)
    with partitioner.context():
      self.params_axes = model.params_logical_axes()
      abstract_params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0))))
      state_shapes = jax.eval_shape(
        lambda p: ts.create(p, self.optimizer.tx, seed), abstract_params
      )
      self.state_axes = ts.logical_axes(state_shapes, self.params_axes)
      self.state_shardings = partitioner.shardings(self.state_axes)
    self.abstract_state = ts.abstract(state_shapes, self.state_shardings)
    self.batch_sharding = partitioner.batch_sharding()
    self._aux_shardings: tuple = ()
    self._compiled_step = None
    self._init_fn = None
    self._opt_init_fn = None
    self._all_finite = jax.jit(
      lambda tree: jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])
      ),
      out_shardings=partitioner.replicated(),
    )

  # ----------------------------------------------------------------------------- state
  def init_state(self) -> ts.TrainState:
    """A freshly initialised state, created directly in its shardings."""
    if self._init_fn is None:
      params_key, _ = ts.seed_keys(self.seed)

      def init():
        return ts.create(nn.unbox(self.model.init(params_key)), self.optimizer.tx, self.seed)

      self._init_fn = jax.jit(init, out_shardings=self.state_shardings)
    with self.partitioner.context():
      return self._init_fn()

  def state_from_params(
    self, params: PyTree, opt_state: PyTree | None = None, step: int = 0
  ) -> ts.TrainState:
    """A state around given params (e.g. after surgery); ``opt_state`` defaults to a fresh one.

    Raises:
      checkpoints.CheckpointMismatchError: params/opt_state do not fit this model/optimizer.
    """
    params = nn.unbox(params)
    problems = checkpoints.compare_shapes(
      checkpoints.target_shapes({"params": params}),
      checkpoints.target_shapes({"params": self.abstract_state.params}),
    )
    if problems:
      raise checkpoints.CheckpointMismatchError(
        "The given params do not match the model:\n" + checkpoints.format_problems(problems)
      )
    # Copies (never aliases) the caller's arrays: the state is donated to the train step, and the
    # caller may still use them (e.g. as a teacher).
    params = jax.device_put(params, self.state_shardings.params, may_alias=False)
    if opt_state is None:
      if self._opt_init_fn is None:
        self._opt_init_fn = jax.jit(
          self.optimizer.tx.init, out_shardings=self.state_shardings.opt_state
        )
      with self.partitioner.context():
        opt_state = self._opt_init_fn(params)
    else:
      problems = checkpoints.compare_shapes(
        checkpoints.target_shapes({"opt_state": opt_state}),
        checkpoints.target_shapes({"opt_state": self.abstract_state.opt_state}),
      )
      if problems:
        raise checkpoints.CheckpointMismatchError(
          "The given optimizer state does not match the optimizer:\n"
          + checkpoints.format_problems(problems)
        )
      opt_state = jax.device_put(opt_state, self.state_shardings.opt_state, may_alias=False)
    rng = jax.device_put(ts.seed_keys(self.seed)[1], self.state_shardings.rng)
    return ts.TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), self.state_shardings.step),
      params=params,
      opt_state=opt_state,
      rng=rng,
    )

  def restore_or_initialize(
    self,
    checkpointer: checkpoint_manager.Checkpointer | None,
    *,
    initial_state: ts.TrainState | None = None,
    restore_checkpoint_path: str | None = None,
    restore_mode: str = "params",
    vocabulary_fingerprint: str | None = None,
  ) -> StartPoint:
    """The state to train from, in priority order:

    1. the latest intact checkpoint of this run (``checkpointer``): exact resume, data position
       included; damaged newer steps are moved aside with one warning;
    2. ``initial_state`` (params and optionally opt_state and step, e.g. after checkpoint surgery);
    3. ``restore_checkpoint_path``: params only (``restore_mode="params"``; fresh optimizer, step
       0) or the full state (``"full"``; optimizer state and step as saved);
    4. a fresh initialisation.

    Raises:
      checkpoints.CheckpointMismatchError: a checkpoint's tree/shapes differ from the model.
      ValueError: vocabulary mismatch or bad ``restore_mode``.
      checkpoints.CheckpointDamagedError: the run has checkpoints but none is intact.
    """
    if restore_mode not in checkpoints.RESTORE_MODES:
      raise ValueError(
        f"restore_mode must be one of {checkpoints.RESTORE_MODES}, got {restore_mode!r}."
      )

    def restore(step_dir: str) -> ts.TrainState:
      checkpoints.check_vocabulary(step_dir, vocabulary_fingerprint)
      return checkpoints.restore_tree(
        step_dir, self.abstract_state, model_config=self.model_config_dict
      )

    # The newest intact step: damaged newer ones are moved aside (see Checkpointer.restore_latest).
    resumed = checkpointer.restore_latest(restore) if checkpointer is not None else None
    if resumed is not None:
      step_dir, state = resumed
      return StartPoint(state, "resumed", step_dir, checkpoints.read_metadata(step_dir))
    if initial_state is not None:
      return StartPoint(
        self.state_from_params(
          initial_state.params, initial_state.opt_state, int(initial_state.step)
        ),
        "initial_state",
      )
    if restore_checkpoint_path:
      step_dir = checkpoints.resolve_step_dir(restore_checkpoint_path)
      checkpoints.check_vocabulary(step_dir, vocabulary_fingerprint)
      if restore_mode == "full":
        state = checkpoints.restore_tree(
          step_dir, self.abstract_state, model_config=self.model_config_dict
        )
        return StartPoint(state, "restored-full")
      params = checkpoints.restore_params(
        step_dir, self.abstract_state.params, model_config=self.model_config_dict
      )
      return StartPoint(self.state_from_params(params), "restored-params")
    return StartPoint(self.init_state(), "initialized")

  def init_aux_states(self, state: ts.TrainState) -> tuple:
    """Builds and shards every regularizer's auxiliary state (call once, before ``fit``)."""
    ctx = losses.RegularizerContext(
      model=self.model,
      params=state.params,
      params_axes=self.params_axes,
      partitioner=self.partitioner,
      step=int(state.step),
    )
    states, shardings = [], []
    for reg in self.regularizers:
      aux, axes = reg.init_state(ctx)
      sh = self.partitioner.shardings(axes)
      # A copy: aux state often starts as the params themselves, which the step donates.
      states.append(jax.device_put(aux, sh, may_alias=False))
      shardings.append(sh)
    self._aux_shardings = tuple(shardings)
    self._compiled_step = None
    return tuple(states)

  # ----------------------------------------------------------------------------- steps
  def _train_step(
    self, state: ts.TrainState, batch: Batch, aux_states: tuple
  ) -> tuple[ts.TrainState, dict[str, Any]]:
    rng = state.step_rng()

    def loss_fn(params):
      return losses.training_loss(self.model, params, batch, rng, self.regularizers, aux_states)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
      metrics,
      learning_rate=jnp.asarray(self.optimizer.learning_rate(state.step), jnp.float32),
      grad_norm=optax.tree.norm(grads),
    )
    if "moe" in metrics:
      metrics["moe"] = {k: v for k, v in metrics["moe"].items() if k != "tokens_per_expert"}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def compile_train_step(self, state: ts.TrainState, batch: Batch, aux_states: tuple = ()):
    """Lowers and compiles the train step for these shapes (ahead of time); returns it."""
    jitted = jax.jit(
      self._train_step,
      in_shardings=(self.state_shardings, self.batch_sharding, self._aux_shardings),
      out_shardings=(self.state_shardings, self.partitioner.replicated()),
      donate_argnums=(0,),
    )
    with self.partitioner.context():
      self._compiled_step = jitted.lower(state, batch, aux_states).compile()
    distributed.barrier("train_step_compiled")  # gloo connects lazily with a 30 s deadline
    return self._compiled_step

  def train_step(
    self, state: ts.TrainState, batch: Batch, aux_states: tuple = ()
  ) -> tuple[ts.TrainState, dict[str, Any]]:
    """One optimizer update on a global batch; ``state`` is donated (do not reuse it)."""
    if self._compiled_step is None:
      self.compile_train_step(state, batch, aux_states)
    return self._compiled_step(state, batch, aux_states)

  def global_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
    """This process's rows ``[per_process_batch, length]`` -> global arrays on the mesh."""
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
      for k, v in local_batch.items()
    }

  def params_finite(self, params: PyTree) -> bool:
    return bool(self._all_finite(params))

  # ----------------------------------------------------------------------------- loop
  def fit(
    self,
    state: ts.TrainState,
    batches: Iterator[Batch],
    *,
    train_steps: int,
    aux_states: tuple = (),
    loop: LoopConfig = LoopConfig(),
    checkpointer: checkpoint_manager.Checkpointer | None = None,
    metadata_fn: Callable[[int, int], Mapping[str, Any]] = lambda step, consumed: {},
    data_iterator: Any = None,
    batches_consumed: int = 0,
    writer: summaries.MetricsWriter | None = None,
    evaluate_fn: Callable[[int, PyTree], Any] | None = None,
  ) -> ts.TrainState:
    """Trains from ``state.step`` to ``train_steps``.

    Args:
      state: start state (donated to the first step).
      batches: iterator of per-process batches (numpy int32 ``[per_process_batch, length]``).
      train_steps: total steps (the loop stops when ``state.step`` reaches it).
      aux_states: from ``init_aux_states``.
      loop: summary / progress / eval intervals.
      checkpointer: saves at its interval and at the end (None: no checkpoints).
      metadata_fn: ``(step, batches_consumed) -> dict`` saved as the checkpoint's metadata.
      data_iterator: checkpointable iterator whose position is saved (None: position tracked by
        ``batches_consumed`` only).
      batches_consumed: batches the data stream had produced before this call.
      writer: train metrics writer (TensorBoard + JSONL).
      evaluate_fn: ``(step, params) -> Any`` called every ``loop.eval_every_steps`` and at the end.
    Returns:
      The final state.
    Raises:
      NonFiniteLossError: a NaN/Inf loss or gradient norm (checked before every save and summary)
        or NaN/Inf params at a save; the non-finite state is never saved.
    """
    step = int(state.step)
    if step >= train_steps:
      summaries.log_info(
        "Already at step %d >= train_steps=%d: nothing to train.", step, train_steps
      )
      return state
    config = self.model.config
    layer_indices = summaries.moe_layer_indices(config) if config.is_moe else []
    pending: list[tuple[int, Any]] = []  # device metrics not yet fetched
    window: list[dict[str, float]] = []  # fetched since the last summary
    timer = summaries.WindowTimer()
    excluded = 0.0  # checkpoint/eval seconds kept out of step_time
    tokens_per_step = 0

    def fetch() -> None:
      nonlocal pending
      if not pending:
        return
      host = jax.device_get([m for _, m in pending])
      records = [
        (s, summaries.flatten_step_metrics(m, layer_indices)) for (s, _), m in zip(pending, host)
      ]
      pending = []
      bad = summaries.first_non_finite(records)
      if bad is not None:
        lr = next((r.get("learning_rate") for s, r in records if s == bad[0]), None)
        raise NonFiniteLossError(
          bad[0], bad[1], bad[2], clip_grad_norm=self.optimizer.clip_grad_norm, learning_rate=lr
        )
      window.extend(r for _, r in records)

    def timing() -> dict[str, float]:
      rates = timer.rates(tokens_per_step)
      steps = max(timer.steps, 1)
      train_time = max(rates["step_time"] * steps - excluded, 1e-9)
      return {
        "step_time": train_time / steps,
        "tokens_per_second": tokens_per_step * steps / train_time,
      }

    summaries.log_info("Training from step %d to %d.", step, train_steps)
    while step < train_steps:
      local = next(batches)
      batch = self.global_batch(local)
      if self._compiled_step is None:
        t0 = time.perf_counter()
        self.compile_train_step(state, batch, aux_states)
        summaries.log_info("Compiled the train step in %.1f s.", time.perf_counter() - t0)
        timer.reset()
      if not tokens_per_step:
        tokens_per_step = int(np.prod(batch["decoder_input_tokens"].shape))
      state, step_metrics = self._compiled_step(state, batch, aux_states)
      step += 1
      batches_consumed += 1
      timer.tick()
      pending.append((step, step_metrics))
      last = step == train_steps
      save = checkpointer is not None and (checkpointer.should_save(step) or last)
      summarize = step % loop.summary_every_steps == 0 or last
      log = step % loop.log_every_steps == 0 or last
      evaluate = (
        evaluate_fn is not None
        and loop.eval_every_steps
        and (step % loop.eval_every_steps == 0 or last)
      )
      if save or summarize or log:
        fetch()
      if summarize or log:
        scalars = dict(summaries.mean_metrics(window), **timing())
        if log:
          summaries.log_info("%s", summaries.progress_line(step, train_steps, scalars))
        if summarize:
          if writer is not None:
            writer.write_scalars(step, scalars)
          window = []
          timer.reset()
          excluded = 0.0
      if save:
        t0 = time.perf_counter()
        if not self.params_finite(state.params):
          raise NonFiniteLossError(step, "parameters", clip_grad_norm=self.optimizer.clip_grad_norm)
        checkpointer.save(
          step, state, metadata_fn(step, batches_consumed), data_iterator=data_iterator
        )
        excluded += time.perf_counter() - t0
      if evaluate:
        t0 = time.perf_counter()
        evaluate_fn(step, state.params)
        excluded += time.perf_counter() - t0
    fetch()
    return state
