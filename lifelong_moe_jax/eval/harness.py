"""lm-evaluation-harness model for this project's checkpoints (``lm_eval`` model ``lifelong_moe_jax``).

EleutherAI's harness (``pip install '.[harness]'``, versions in ``requirements-harness.lock``) runs
its tasks against an ``lm_eval.api.model.LM``. ``LifelongMoeLM`` is that model for a checkpoint of
ours::

    lm-eval / python -m lifelong_moe_jax.harness --checkpoint runs/demo/lifelong_moe/... \\
      --tasks arc_easy,my_task --include_path my_tasks/
    # model args: checkpoint=DIR,gin_file=a.gin+b.gin,batch_size=8,max_length=512,max_gen_toks=64,
    #             data_dir=./data

Requests:

* ``loglikelihood((context, continuation))`` -> ``(log p(continuation | context), is_greedy)``.
  Tokens come from ``prompts.encode_pair`` (the longest common prefix of ``encode(context)`` and
  ``encode(context + continuation)``, the tokenization of our own few-shot engine). The sequence is
  scored as the model was trained: ``[BOS, x_1 .. x_{n-1}]`` in, ``x_1 .. x_n`` out; a sequence
  longer than the window (``max_length`` tokens) is cut from the left. ``is_greedy`` says every
  continuation token is the argmax of its distribution (padding id excluded, as in decoding).
* ``loglikelihood_rolling((text,))`` -> sum of ``log p`` of every token of ``text``, each scored
  exactly once: the first window holds tokens ``[0, W)`` after BOS; every later window predicts up
  to ``W - 1`` new tokens conditioned on the one token before them (the harness's
  ``get_rolling_token_windows`` with ``context_len=1``). A text of at most ``W`` tokens is one
  window, i.e. the plain teacher-forced sum.
* ``generate_until((context, gen_kwargs))`` -> text generated with the KV cache
  (``decoding.generate``): greedy unless ``do_sample`` with ``temperature > 0``; at most
  ``max_gen_toks`` tokens; stops at EOS (and early at an ``until`` string that is a single token);
  the text is cut at the first ``until`` string. Contexts are cut from the left to fit.

Requests are sorted by length and run in batches of ``batch_size`` rows (a multiple of the
mesh's ``data x expert`` shards), padded to power-of-two lengths so few shapes compile; params
stay sharded as restored by ``checkpoints.load_checkpoint`` (which checks the vocabulary
fingerprint stored with the checkpoint). No-drop expert capacity (``decoding.no_drop_config``)
makes a request's score independent of its batch.

Offline: importing this module sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` unless the
environment says otherwise; harness tasks then read local files (``dataset_path: json`` with
``data_files``, see ``harness_tasks.write_task_yaml``) or an already prepared HF datasets cache.

Running harness tasks on the model (``evaluate``, ``metric_values``) and exporting our few-shot
tasks as local harness tasks are in ``eval.harness_tasks``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Iterable, Mapping, Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lifelong_moe_jax import checkpoints  # noqa: E402
from lifelong_moe_jax import decoding  # noqa: E402
from lifelong_moe_jax import partitioning  # noqa: E402
from lifelong_moe_jax.eval import fewshot as fewshot_lib  # noqa: E402
from lifelong_moe_jax.eval import prompts  # noqa: E402
from lifelong_moe_jax.models.config import ModelConfig  # noqa: E402
from lifelong_moe_jax.models.lm import LanguageModel  # noqa: E402

MODEL_NAME = "lifelong_moe_jax"
EXTRA = "harness"
INSTALL_HINT = (
  "pip install -e '.[harness]' (exact versions: pip install --no-deps -r "
  "requirements-harness.lock; `make setup` does that)"
)
_MIN_BUCKET = 16
DEFAULT_BATCH_SIZE = 8

try:  # The class below subclasses the harness's LM when the extra is installed.
  from lm_eval.api.model import LM as _HarnessLM  # noqa: E402
  from lm_eval.api import registry as _registry  # noqa: E402
except (
  ImportError
):  # pragma: no cover - exercised by the missing-extra test through require_harness
  _HarnessLM = object
  _registry = None


class HarnessNotInstalledError(ImportError):
  """The optional ``harness`` extra (lm-evaluation-harness) is not installed."""


def require_harness() -> Any:
  """The ``lm_eval`` module.

  Raises:
    HarnessNotInstalledError: lm-eval cannot be imported; the message names the extra to install.
  """
  try:
    return importlib.import_module("lm_eval")
  except ImportError as e:
    raise HarnessNotInstalledError(
      f"lm-evaluation-harness (lm_eval) is not installed ({e}): it is the optional extra "
      f"'{EXTRA}' of lifelong_moe_jax; install it with {INSTALL_HINT}."
    ) from e


def _bucket(n: int, cap: int) -> int:
  """Smallest power of two >= max(n, 16), at most ``cap``."""
  size = _MIN_BUCKET
  while size < n:
    size *= 2
  return min(size, cap)


# ------------------------------------------------------------------------------------ scoring
@functools.lru_cache(maxsize=16)
def _token_scores_fn(config: ModelConfig):
  """jit'd ``(params, tokens int [b, L]) -> (log p float32 [b, L], is_argmax bool [b, L])``."""
  model = LanguageModel(config)

  def fn(params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    inputs = jnp.concatenate(
      [jnp.full((tokens.shape[0], 1), decoding.BOS_ID, jnp.int32), tokens[:, :-1]], axis=1
    )
    logits = model.logits(params, {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens})
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    best = jnp.argmax(logits.at[..., decoding.PAD_ID].set(-jnp.inf), axis=-1)
    real = tokens != decoding.PAD_ID
    return jnp.where(real, token_ll, 0.0), (best == tokens) | ~real

  return jax.jit(fn)


def rolling_windows(num_tokens: int, window: int) -> list[tuple[int, int, int]]:
  """``(start, first_scored, end)`` token ranges of the rolling windows over a document.

  Window ``(s, p, e)`` feeds ``[BOS, t_s .. t_{e-2}]`` and scores tokens ``t_p .. t_{e-1}``; the
  scored ranges partition ``[0, num_tokens)``. The first window is ``(0, 0, min(W, n))``; later
  ones condition on one token (``s = p - 1``) and score up to ``W - 1`` tokens.

  Args:
    num_tokens: document length n.
    window: W, tokens per window (>= 2).
  """
  if window < 2:
    raise ValueError(f"A rolling window needs at least 2 tokens, got {window}.")
  if num_tokens == 0:
    return []
  out = [(0, 0, min(window, num_tokens))]
  pos = out[0][2]
  while pos < num_tokens:
    end = min(num_tokens, pos + window - 1)
    out.append((pos - 1, pos, end))
    pos = end
  return out


# ------------------------------------------------------------------------------------ model
class LifelongMoeLM(_HarnessLM):
  """A checkpoint of ours as an lm-evaluation-harness model (see module docstring).

  Attributes:
    loaded: the restored checkpoint (model, sharded params, vocabulary, partitioner).
    batch_size: rows per compiled call (a multiple of the ``data x expert`` mesh shards).
    max_length: window W in tokens (BOS included), at most ``ModelConfig.max_length``.
    max_gen_toks: default generation budget when a request gives none.
  """

  def __init__(
    self,
    checkpoint: str | None = None,
    gin_file: str | Sequence[str] | None = None,
    batch_size: int | str = 8,
    max_length: int | str | None = None,
    max_gen_toks: int | str = 256,
    data_dir: str | None = None,
    *,
    loaded: checkpoints.LoadedCheckpoint | None = None,
    **unused: Any,
  ):
    """Restores ``checkpoint`` (or wraps ``loaded``).

    Args:
      checkpoint: a step dir or MODEL_DIR (latest step).
      gin_file: gin file(s) (``a.gin+b.gin`` or a list) for the mesh, the vocabulary and, for
        checkpoints that store no model config, the model.
      batch_size: rows per call; ``"auto"`` (the harness's ``auto[:N]``) or None means 8.
      max_length: window length (default: the model's ``max_length``).
      max_gen_toks: generation budget when a request gives no ``max_gen_toks``.
      data_dir: where the vocabulary is (None: the usual resolution).
      loaded: an already restored checkpoint (the lifelong runner's phase model).
      **unused: harness options meant for other backends (``device``, ``max_batch_size``).
    Raises:
      HarnessNotInstalledError: the extra is missing.
      checkpoints.CheckpointNotFoundError / CheckpointMismatchError / ValueError (vocabulary).
    """
    require_harness()
    super().__init__()
    del unused
    if loaded is None:
      if not checkpoint:
        raise ValueError(
          "The lifelong_moe_jax harness model needs checkpoint=DIR "
          "(--model_args checkpoint=... or --checkpoint)."
        )
      loaded = load(checkpoint, gin_file, data_dir)
    self.loaded = loaded
    config_len = loaded.model.config.max_length
    self.max_length = int(max_length) if max_length not in (None, "") else config_len
    if not 2 <= self.max_length <= config_len:
      raise ValueError(
        f"max_length={self.max_length} must be in [2, ModelConfig.max_length={config_len}]."
      )
    auto = batch_size in (None, "") or str(batch_size).startswith("auto")
    self.batch_size = DEFAULT_BATCH_SIZE if auto else int(batch_size)
    partitioning.validate_batch_for_mesh(self.batch_size, loaded.partitioner.mesh)
    self.max_gen_toks = int(max_gen_toks)
    mesh = loaded.partitioner.mesh
    self._shards = mesh.shape["data"] * mesh.shape["expert"]

  @classmethod
  def from_parts(
    cls,
    model: LanguageModel,
    params: Any,
    vocabulary: Any,
    partitioner: partitioning.Partitioner,
    **kwargs: Any,
  ) -> "LifelongMoeLM":
    """Wraps an in-memory model (e.g. a lifelong phase's final params) without restoring."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel

    loaded = checkpoints.LoadedCheckpoint(
      model, nn.unbox(params), vocabulary, partitioner, "", 0, {}
    )
    return cls(loaded=loaded, **kwargs)

  # ---------------------------------------------------------------------------- properties
  @property
  def vocabulary(self) -> Any:
    return self.loaded.vocabulary

  @property
  def eot_token_id(self) -> int:
    return int(self.vocabulary.eos_id)

  @property
  def tokenizer_name(self) -> str:
    return f"{MODEL_NAME}-{os.path.basename(self.loaded.step_dir) or 'memory'}"

  # ---------------------------------------------------------------------------- token level
  def token_scores(self, sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-token ``(log p float64 [n], is_argmax bool [n])`` of each sequence, ``n <= max_length``.

    Token ``i`` is predicted from ``[BOS, x_0 .. x_{i-1}]``. Sequences are run longest first in
    batches of ``batch_size`` rows, padded on the right to a power-of-two length.
    """
    for s in sequences:
      if len(s) > self.max_length:
        raise ValueError(f"A sequence of {len(s)} tokens exceeds the window of {self.max_length}.")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[Any] = [None] * len(sequences)
    loaded = self.loaded
    sharding = loaded.partitioner.batch_sharding()
    with loaded.partitioner.context():
      for start in range(0, len(order), self.batch_size):
        batch = order[start : start + self.batch_size]
        width = _bucket(max(max(len(sequences[i]) for i in batch), 1), self.max_length)
        arr = np.zeros((self.batch_size, width), np.int32)
        for row, i in enumerate(batch):
          arr[row, : len(sequences[i])] = sequences[i]
        config = decoding.no_drop_config(
          loaded.model.config, min(loaded.model.config.group_size, width)
        )
        ll, greedy = _token_scores_fn(config)(loaded.params, jax.device_put(arr, sharding))
        ll, greedy = np.asarray(ll, np.float64), np.asarray(greedy)
        for row, i in enumerate(batch):
          n = len(sequences[i])
          out[i] = (ll[row, :n], greedy[row, :n])
    return out

  def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as our few-shot engine tokenizes them (``encode_pair``)."""
    return prompts.encode_pair(self.vocabulary, context, continuation)

  def score_pairs(
    self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
  ) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` per token pair; cut from the left."""
    seqs, counts = [], []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError("A loglikelihood request has an empty continuation: nothing to score.")
      seq = (list(ctx) + list(cont))[-self.max_length :]
      seqs.append(seq)
      counts.append(min(len(cont), len(seq)))
    results = []
    for (ll, greedy), n in zip(self.token_scores(seqs), counts):
      results.append((float(ll[-n:].sum()), bool(greedy[-n:].all())))
    return results

  def rolling_token_scores(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Per-token log-likelihoods of each text over rolling windows (``rolling_windows``)."""
    tokens = [list(self.vocabulary.encode(t)) for t in texts]
    seqs, where = [], []
    for d, ids in enumerate(tokens):
      for start, first, end in rolling_windows(len(ids), self.max_length):
        seqs.append(ids[start:end])
        where.append((d, first - start))
    scores = self.token_scores(seqs)
    per_doc: list[list[np.ndarray]] = [[] for _ in texts]
    for (d, skip), (ll, _) in zip(where, scores):
      per_doc[d].append(ll[skip:])
    return [np.concatenate(parts) if parts else np.zeros((0,), np.float64) for parts in per_doc]

  def generate_texts(
    self,
    contexts: Sequence[str],
    until: Sequence[str],
    max_gen_toks: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
  ) -> list[str]:
    """Continuations of ``contexts`` (same settings for all), cut at the first ``until`` string."""
    loaded = self.loaded
    max_gen_toks = max(1, min(int(max_gen_toks), self.max_length - 2))
    budget = self.max_length - 1 - max_gen_toks
    vocab = self.vocabulary
    stops = [vocab.eos_id] + [
      t for t in (fewshot_lib.stop_token_id(vocab, u) for u in until) if t is not None
    ]
    ids = [list(vocab.encode(c))[-budget:] for c in contexts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [""] * len(ids)
    sharding = loaded.partitioner.batch_sharding()
    group_size = max(1, self.batch_size // self._shards)
    rng = jax.random.PRNGKey(seed)
    with loaded.partitioner.context():
      for b, start in enumerate(range(0, len(order), self.batch_size)):
        batch = order[start : start + self.batch_size]
        width = _bucket(max(max(len(ids[i]) for i in batch), 1), budget)
        arr = np.zeros((self.batch_size, width), np.int32)
        for row, i in enumerate(batch):
          if ids[i]:
            arr[row, width - len(ids[i]) :] = ids[i]
        result = decoding.generate(
          loaded.model,
          loaded.params,
          jax.device_put(arr, sharding),
          max_decode_len=max_gen_toks,
          rng=jax.random.fold_in(rng, b),
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          stop_ids=tuple(stops),
          group_size=group_size,
        )
        tokens = np.asarray(result.tokens)
        for row, i in enumerate(batch):
          gen = []
          for t in tokens[row].tolist():
            if t in stops or t == decoding.PAD_ID:
              break
            gen.append(t)
          out[i] = cut_at(vocab.decode(gen), until)
    return out

  # ---------------------------------------------------------------------------- harness API
  def loglikelihood(
    self, requests: Sequence[Any], disable_tqdm: bool = False
  ) -> list[tuple[float, bool]]:
    """``[(log p(continuation | context), is_greedy)]`` of requests with args (context, cont)."""
    del disable_tqdm
    pairs = [self.encode_request(*req.args[:2]) for req in requests]
    results = self.score_pairs(pairs)
    for req, res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, res)
    return results

  def loglikelihood_rolling(
    self, requests: Sequence[Any], disable_tqdm: bool = False
  ) -> list[float]:
    """Total log-likelihood of each request's text (args ``(text,)``), every token once."""
    del disable_tqdm
    results = [float(s.sum()) for s in self.rolling_token_scores([r.args[0] for r in requests])]
    for req, res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
    return results

  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    """Generations for requests with args ``(context, gen_kwargs)`` (see module docstring)."""
    del disable_tqdm
    groups: dict[tuple, list[int]] = {}
    settings = []
    for i, req in enumerate(requests):
      context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
      setting = generation_settings(kwargs, self.max_gen_toks)
      settings.append((context, setting))
      groups.setdefault(setting, []).append(i)
    out = [""] * len(requests)
    for setting, members in groups.items():
      until, max_gen, temperature, top_k, top_p = setting
      texts = self.generate_texts(
        [settings[i][0] for i in members],
        list(until),
        max_gen,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
      )
      for i, text in zip(members, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def generation_settings(
  kwargs: Mapping[str, Any], default_max_gen_toks: int
) -> tuple[tuple[str, ...], int, float, int, float]:
  """``(until, max_gen_toks, temperature, top_k, top_p)`` of a request's gen_kwargs.

  Greedy (temperature 0) unless ``do_sample`` is true or absent with ``temperature > 0``; a
  ``do_sample`` request without a temperature samples at temperature 1.
  """
  until = kwargs.get("until") or ()
  until = (until,) if isinstance(until, str) else tuple(str(u) for u in until)
  temperature = float(kwargs.get("temperature", 0.0) or 0.0)
  do_sample = kwargs.get("do_sample")
  if do_sample is None:
    do_sample = temperature > 0
  if not do_sample:
    temperature = 0.0
  elif temperature == 0.0:
    temperature = 1.0
  return (
    until,
    int(kwargs.get("max_gen_toks", default_max_gen_toks)),
    temperature,
    int(kwargs.get("top_k", 0) or 0),
    float(kwargs.get("top_p", 1.0) or 1.0),
  )


def cut_at(text: str, until: Iterable[str]) -> str:
  """``text`` up to the first occurrence of any ``until`` string."""
  cut = len(text)
  for u in until:
    if u and u in text:
      cut = min(cut, text.index(u))
  return text[:cut]


if _registry is not None:
  _registry.register_model(MODEL_NAME)(LifelongMoeLM)


# ------------------------------------------------------------------------------------ loading
def load(
  checkpoint: str, gin_file: str | Sequence[str] | None = None, data_dir: str | None = None
) -> checkpoints.LoadedCheckpoint:
  """Parses ``gin_file`` (``a.gin+b.gin`` or a list; none: current gin config) and restores."""
  from lifelong_moe_jax import gin_utils  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.data import data_dir as data_dir_lib  # pylint: disable=import-outside-toplevel

  files = [f for f in (gin_file.split("+") if isinstance(gin_file, str) else gin_file or ()) if f]
  if files:
    gin_utils.parse_gin(files, [], finalize=False)
  with data_dir_lib.using_data_dir(data_dir):
    return checkpoints.load_checkpoint(checkpoints.absolute(checkpoint), data_dir=data_dir)
