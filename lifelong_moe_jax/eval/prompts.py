"""Few-shot task definitions, k-shot prompt construction, tokenization and seqio registration.

A ``FewShotTask`` turns a split into ``FewShotExample`` objects (one question each). A k-shot prompt
is ``k`` demonstrations followed by the query, joined by the task's separator (default a blank
line, ``"\\n\\n"``, as in GPT-3)::

    <demo 1 prompt><demo 1 answer>\\n\\n ... <demo k prompt><demo k answer>\\n\\n<query prompt>

and the model is asked for the continuation: one of ``choices`` (multiple choice, ranked by
log-likelihood) or a free generation (compared with ``answers``). Demonstrations for query ``i``
are drawn without replacement from the task's ``demo_split`` with a generator seeded by
``(task name, seed, i)`` (query ``i`` itself is excluded when demonstrations come from the same
split), so prompts are identical across runs and phases.

Rows. Every example becomes rows ``{"inputs", "targets", "idx", "choice", "is_correct",
"answers"}``: one per choice for multiple choice (``targets`` = the choice), one for generation
(``targets`` = the first answer, ``answers`` = all acceptable ones). The same rows feed
``eval.fewshot.run_fewshot`` (Python) and the registered seqio task (``inputs`` / ``targets``
features, for ``infer`` score / predict modes).

Tokenization (``encode_pair``): ``full = encode(inputs + targets)``; ``inputs`` tokens are the
longest common prefix of ``full`` and ``encode(inputs)`` (at most ``len(full) - 1``) and ``targets``
tokens the rest. So a continuation " Paris" is scored as the tokens it has inside the whole text
(``▁Paris``), not as a separately encoded string (``▁``, ``▁Paris`` with SentencePiece's dummy
prefix). No EOS is appended to either.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Iterator, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import metrics as metrics_lib

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
DEFAULT_SEPARATOR = "\n\n"


class FewShotError(ValueError):
  """A few-shot task is unknown, misconfigured or has no data."""


@dataclasses.dataclass(frozen=True)
class FewShotExample:
  """One question.

  Attributes:
    prompt: text the model continues (without any demonstrations).
    choices: candidate continuations (multiple choice); empty for generation.
    correct: indices of the correct choices (at least one for multiple choice; the first is the
      one shown when the example is a demonstration).
    answers: acceptable answers (generation); the first is shown in demonstrations.
    choice_prompts: optional per-choice prompts (WinoGrande-style partial scoring, where the
      option is substituted into the prompt and the shared remainder is scored); default: ``prompt``.
  """

  prompt: str
  choices: tuple[str, ...] = ()
  correct: tuple[int, ...] = ()
  answers: tuple[str, ...] = ()
  choice_prompts: tuple[str, ...] = ()

  def __post_init__(self):
    if self.choices:
      if not self.correct or any(not 0 <= c < len(self.choices) for c in self.correct):
        raise FewShotError(
          f"Multiple-choice example needs correct indices in [0, "
          f"{len(self.choices)}), got {self.correct} (prompt {self.prompt[:60]!r})."
        )
      if self.choice_prompts and len(self.choice_prompts) != len(self.choices):
        raise FewShotError("choice_prompts must have one prompt per choice.")
    elif not self.answers:
      raise FewShotError(f"Example needs choices or answers (prompt {self.prompt[:60]!r}).")

  @property
  def is_multiple_choice(self) -> bool:
    return bool(self.choices)

  def prompt_for(self, choice: int) -> str:
    return self.choice_prompts[choice] if self.choice_prompts else self.prompt

  def demonstration(self) -> str:
    """The solved example: prompt followed by its (first) correct continuation."""
    if self.is_multiple_choice:
      c = self.correct[0]
      return self.prompt_for(c) + self.choices[c]
    return self.prompt + self.answers[0]


@dataclasses.dataclass(frozen=True)
class FewShotTask:
  """A few-shot evaluation task.

  Attributes:
    name: registry and seqio task name.
    kind: ``"multiple_choice"`` (rank classification) or ``"generation"`` (exact match, F1).
    load: ``split -> Sequence[FewShotExample]`` in a fixed order (loaders shuffle
      deterministically, so the first N examples are a fair sample).
    eval_split: split scored by default.
    demo_split: split demonstrations are drawn from.
    separator: text between demonstrations and before the query.
    description: one line for docs and listings.
    normalize: answer normalisation for generation metrics (``"squad"`` or ``"code"``).
    max_decode_len: tokens generated per query (generation).
    stop: generations are cut at the first occurrence of this string (generation).
    primary_metric: the metric to quote for this task.
    is_available: ``() -> bool``, whether the task's data is present; set by task modules for the
      tasks that ``run_fewshot(task_names=None)`` runs by default (``available_tasks``). Tasks
      without it (e.g. the GLaM suite, whose data is checked only when loaded) run only when named.
  """

  name: str
  kind: str
  load: Callable[[str], Sequence[FewShotExample]]
  eval_split: str = "validation"
  demo_split: str = "train"
  separator: str = DEFAULT_SEPARATOR
  description: str = ""
  normalize: str = "squad"
  max_decode_len: int = 32
  stop: str = "\n"
  primary_metric: str = ""
  is_available: Callable[[], bool] | None = None

  def __post_init__(self):
    if self.kind not in (MULTIPLE_CHOICE, GENERATION):
      raise FewShotError(
        f"Task {self.name}: kind must be {MULTIPLE_CHOICE!r} or {GENERATION!r}, got {self.kind!r}."
      )
    if self.normalize not in metrics_lib.NORMALIZATIONS:
      raise FewShotError(
        f"Task {self.name}: normalize must be one of {metrics_lib.NORMALIZATIONS}."
      )
    if not self.primary_metric:
      default = "accuracy" if self.kind == MULTIPLE_CHOICE else "exact_match"
      object.__setattr__(self, "primary_metric", default)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys((self.eval_split, self.demo_split)))

  def metric_fns(self) -> list[Callable[..., dict[str, float]]]:
    """seqio metric functions: rank classification, or exact match + token F1."""
    if self.kind == MULTIPLE_CHOICE:
      return [metrics_lib.rank_classification]
    if self.normalize == "code":
      return [metrics_lib.code_exact_match, metrics_lib.code_token_f1]
    return [metrics_lib.exact_match, metrics_lib.token_f1]


# ------------------------------------------------------------------------------------ registry
_TASKS: dict[str, FewShotTask] = {}


@gin.configurable("fewshot_defaults")
@dataclasses.dataclass(frozen=True)
class FewshotDefaults:
  """Demonstrations per prompt and demonstration seed, when a caller does not give them.

  Used by the seqio tasks, ``iter_rows`` and ``run_fewshot``. Gin-configurable under the name
  ``fewshot_defaults`` (``fewshot_defaults.num_shots = 3``, ``fewshot_defaults.seed = 1``), so
  ``FewshotDefaults()`` reads the bindings; explicit arguments override them.

  Attributes:
    num_shots: demonstrations per prompt (k), >= 0.
    seed: demonstration seed.
  """

  num_shots: int = 1
  seed: int = 0

  def __post_init__(self):
    if int(self.num_shots) < 0:
      raise FewShotError(f"fewshot_defaults.num_shots must be >= 0, got {self.num_shots}.")
    object.__setattr__(self, "num_shots", int(self.num_shots))
    object.__setattr__(self, "seed", int(self.seed))


def register(task: FewShotTask, *, seqio_task: bool = True) -> FewShotTask:
  """Adds (or replaces) ``task`` in the few-shot registry and, by default, as a seqio task."""
  _TASKS[task.name] = task
  if seqio_task:
    register_seqio_task(task)
  return task


def get_task(name: str) -> FewShotTask:
  """The registered task ``name``.

  Raises:
    FewShotError: unknown name; the message lists the registered tasks and says which modules
      register them.
  """
  if name not in _TASKS:
    raise FewShotError(
      f"Unknown few-shot task {name!r}. Registered: {', '.join(sorted(_TASKS)) or '(none)'}. "
      "Few-shot tasks are registered by importing a task module: the CLIs import the modules "
      "named by --tasks_module (default: tasks, which registers tasks.fewshot and "
      "tasks.glam_suite); in Python, `import tasks` first."
    )
  return _TASKS[name]


def task_names(prefix: str = "") -> list[str]:
  """Sorted names of registered few-shot tasks starting with ``prefix``."""
  return sorted(n for n in _TASKS if n.startswith(prefix))


def available_tasks() -> list[str]:
  """Registered tasks whose ``is_available()`` says their data is present, in registration order.

  This is the default task list of ``run_fewshot`` (the embedded tasks of ``tasks/fewshot.py``
  once that module is imported); tasks registered without ``is_available`` are not included.
  """
  return [
    name for name, task in _TASKS.items() if task.is_available is not None and task.is_available()
  ]


# ------------------------------------------------------------------------------------ prompts
def stable_seed(*parts: Any) -> int:
  """A 63-bit seed from the parts' text (independent of PYTHONHASHSEED)."""
  digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def stable_shuffle(items: Sequence[Any], *seed_parts: Any) -> list[Any]:
  """``items`` in a deterministic pseudo-random order."""
  order = np.random.default_rng(stable_seed(*seed_parts)).permutation(len(items))
  return [items[i] for i in order]


def pick_distractors(
  answer: str, pool: Sequence[str], count: int, *seed_parts: Any, exclude: Sequence[str] = ()
) -> list[str]:
  """``count`` distinct strings from ``pool`` that differ from ``answer`` and ``exclude``
  (case-insensitive), chosen with a generator seeded by ``seed_parts``; fewer only if the pool has
  too few."""
  rng = np.random.default_rng(stable_seed("distractors", *seed_parts))
  seen = {a.strip().lower() for a in (answer, *exclude)}
  out: list[str] = []
  for _ in range(20 * count):  # random probes: O(count) for the usual large pools
    if len(out) == count or not pool:
      return out
    candidate = pool[int(rng.integers(len(pool)))]
    if candidate.strip().lower() not in seen:
      seen.add(candidate.strip().lower())
      out.append(candidate)
  for i in rng.permutation(len(pool)):  # small or repetitive pool: scan it all
    if len(out) == count:
      break
    if pool[i].strip().lower() not in seen:
      seen.add(pool[i].strip().lower())
      out.append(pool[i])
  return out


def multiple_choice(
  prompt: str,
  answer: str,
  distractors: Sequence[str],
  *seed_parts: Any,
  choice_prompts: Sequence[str] = (),
) -> FewShotExample:
  """A multiple-choice example with the answer placed at a seeded position among the distractors."""
  choices = list(distractors)
  position = int(
    np.random.default_rng(stable_seed("position", *seed_parts)).integers(len(choices) + 1)
  )
  choices.insert(position, answer)
  return FewShotExample(
    prompt=prompt, choices=tuple(choices), correct=(position,), choice_prompts=tuple(choice_prompts)
  )


def demonstrations(
  task: FewShotTask, index: int, num_shots: int, split: str, seed: int = 0
) -> list[FewShotExample]:
  """The ``num_shots`` demonstrations for query ``index`` of ``split``."""
  if num_shots == 0:
    return []
  pool = task.load(task.demo_split)
  candidates = [i for i in range(len(pool)) if not (split == task.demo_split and i == index)]
  if len(candidates) < num_shots:
    raise FewShotError(
      f"Task {task.name}: {num_shots} demonstrations requested but split "
      f"{task.demo_split!r} has only {len(candidates)} usable examples."
    )
  rng = np.random.default_rng(stable_seed(task.name, seed, index))
  picks = rng.choice(len(candidates), size=num_shots, replace=False)
  return [pool[candidates[int(p)]] for p in picks]


def render(
  task: FewShotTask, example: FewShotExample, demos: Sequence[FewShotExample], choice: int = 0
) -> str:
  """The k-shot prompt for ``example`` (for ``choice``'s prompt when choices have their own)."""
  parts = [d.demonstration() for d in demos] + [example.prompt_for(choice)]
  return task.separator.join(parts)


def iter_rows(
  task: FewShotTask,
  split: str | None = None,
  num_shots: int | None = None,
  max_examples: int | None = None,
  seed: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Rows of the first ``max_examples`` examples of ``split`` (see module docstring)."""
  defaults = FewshotDefaults()
  num_shots = defaults.num_shots if num_shots is None else int(num_shots)
  seed = defaults.seed if seed is None else int(seed)
  split = split or task.eval_split
  examples = task.load(split)
  if not examples:
    raise FewShotError(f"Task {task.name}: split {split!r} has no examples.")
  if max_examples is not None:
    examples = examples[:max_examples]
  for i, ex in enumerate(examples):
    demos = demonstrations(task, i, num_shots, split, seed)
    if ex.is_multiple_choice:
      correct = [ex.choices[c] for c in ex.correct]
      for j, choice in enumerate(ex.choices):
        yield {
          "inputs": render(task, ex, demos, j),
          "targets": choice,
          "idx": i,
          "choice": j,
          "is_correct": j in ex.correct,
          "answers": correct,
        }
    else:
      yield {
        "inputs": render(task, ex, demos),
        "targets": ex.answers[0],
        "idx": i,
        "choice": 0,
        "is_correct": True,
        "answers": list(ex.answers),
      }


# ------------------------------------------------------------------------------ tokenization
def encode_pair(
  vocabulary: seqio.Vocabulary, inputs: str, targets: str
) -> tuple[list[int], list[int]]:
  """(inputs ids, targets ids) of ``inputs + targets`` split as described in the module docstring."""
  full = list(vocabulary.encode(inputs + targets))
  ctx = list(vocabulary.encode(inputs))
  limit = max(min(len(ctx), len(full) - 1), 0)
  n = 0
  while n < limit and ctx[n] == full[n]:
    n += 1
  return full[:n], full[n:]


def encode_pair_tf(
  vocabulary: seqio.Vocabulary, inputs: tf.Tensor, targets: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """TF-graph version of ``encode_pair`` (same result) for seqio preprocessing."""
  full = tf.cast(vocabulary.encode_tf(tf.strings.join([inputs, targets])), tf.int32)
  ctx = tf.cast(vocabulary.encode_tf(inputs), tf.int32)
  limit = tf.maximum(tf.minimum(tf.size(ctx), tf.size(full) - 1), 0)
  same = tf.cast(tf.equal(ctx[:limit], full[:limit]), tf.int32)
  n = tf.reduce_sum(tf.math.cumprod(same))
  return full[:n], full[n:]


def tokenize_prompt_and_continuation(
  dataset: tf.data.Dataset, output_features: seqio.preprocessors.OutputFeaturesType
) -> tf.data.Dataset:
  """seqio preprocessor: tokenizes ``inputs``/``targets`` with ``encode_pair_tf``; keeps the text as
  ``inputs_pretokenized`` / ``targets_pretokenized``."""
  vocabulary = output_features["targets"].vocabulary

  def fn(ex):
    inputs, targets = encode_pair_tf(vocabulary, ex["inputs"], ex["targets"])
    return {
      **ex,
      "inputs": inputs,
      "targets": targets,
      "inputs_pretokenized": ex["inputs"],
      "targets_pretokenized": ex["targets"],
    }

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------ seqio
_ROW_SIGNATURE = {
  "inputs": tf.TensorSpec([], tf.string),
  "targets": tf.TensorSpec([], tf.string),
  "idx": tf.TensorSpec([], tf.int32),
  "choice": tf.TensorSpec([], tf.int32),
  "is_correct": tf.TensorSpec([], tf.bool),
  "answers": tf.TensorSpec([None], tf.string),
}


def _dataset_fn(
  split: str, shuffle_files: bool, seed: int | None = None, *, task_name: str
) -> tf.data.Dataset:
  del shuffle_files, seed  # rows are deterministic; the demonstration seed comes from gin
  task = get_task(task_name)
  rows = list(iter_rows(task, split))

  def gen():
    for r in rows:
      yield {**r, "answers": np.array(r["answers"] or [""], dtype=object)}

  return tf.data.Dataset.from_generator(gen, output_signature=_ROW_SIGNATURE)


class FewShotPostprocessor:
  """seqio ``postprocess_fn``: targets -> ``RankTarget`` (multiple choice) or the answer list;
  predictions -> text cut at the task's stop string and stripped."""

  def __init__(self, task_name: str):
    self.task_name = task_name

  def __call__(
    self, output: Any, example: dict[str, Any] | None = None, is_target: bool = False
  ) -> Any:
    task = get_task(self.task_name)
    if isinstance(output, bytes):
      output = output.decode("utf-8")
    if is_target:
      if example is None:
        return output
      if task.kind == MULTIPLE_CHOICE:
        return metrics_lib.RankTarget(
          int(example["idx"]), bool(example["is_correct"]), len(example["targets"])
        )
      return [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in example["answers"]]
    return clean_prediction(output, task.stop)


def clean_prediction(text: str, stop: str) -> str:
  """The generation up to the first ``stop`` (if any), stripped of surrounding whitespace."""
  if stop and stop in text:
    text = text[: text.index(stop)]
  return text.strip()


def register_seqio_task(
  task: FewShotTask, vocabulary: seqio.Vocabulary | None = None
) -> seqio.Task:
  """Registers (or replaces) seqio task ``task.name`` over the task's rows.

  Features ``inputs`` and ``targets`` (no EOS) use ``vocabulary`` (default: the project's lazily
  resolved vocabulary ``vocab.shared_vocabulary()``, ``get_vocabulary`` from gin, the instance the
  corpus tasks use, so mixtures of both compare equal by identity). Extra fields ``idx``, ``choice``,
  ``is_correct``, ``answers`` pass through for the metrics.
  """
  if vocabulary is None:
    vocabulary = vocab_lib.shared_vocabulary()
  features = {
    "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
    "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
  }
  if task.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task.name)
  return seqio.TaskRegistry.add(
    task.name,
    source=seqio.FunctionDataSource(
      functools.partial(_dataset_fn, task_name=task.name),
      splits=task.splits,
      caching_permitted=False,
    ),
    output_features=features,
    preprocessors=[tokenize_prompt_and_continuation],
    postprocess_fn=FewShotPostprocessor(task.name),
    metric_fns=task.metric_fns(),
  )
