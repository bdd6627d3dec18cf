r"""Cost of checkpoint verification (sha256 manifests), measured here and extrapolated to GLaM.

  python benchmarks/checkpoint_verify.py [--size_mb 512] [--rounds 3] [--workers N] \
      [--gin_file models/glam_0.1b_64e.gin] [--optimizer adafactor]

1. Saves a real checkpoint of about ``--size_mb`` MB with ``checkpoint_manager.Checkpointer``
   (synchronous; the orbax settings of training: OCDBT, zstd): a state of float32 arrays drawn from
   a normal distribution (like weights, so compression behaves as it does on weights).
2. Times (median of ``--rounds``): writing the manifest (list + sha256 of every file); full
   verification (sizes + sha256, as on resume) with the files in the page cache ("warm") and after
   asking the kernel to drop them from it ("cold": fsync + posix_fadvise(DONTNEED) per file, best
   effort); the sizes-only check (as ``resolve_step_dir`` does).
3. Sizes the train state of the ``--gin_file`` model (params + optimizer state) from abstract
   shapes (``jax.eval_shape`` of the model init and of the optimizer init, as ``Trainer`` builds
   it; nothing is allocated) and extrapolates the verification time at the measured rates.

MB = 10^6 bytes; throughput counts the bytes on disk.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lifelong_moe_jax import checkpoint_manifest  # noqa: E402
from lifelong_moe_jax import checkpoint_manager  # noqa: E402
from lifelong_moe_jax import checkpoints  # noqa: E402
from lifelong_moe_jax import gin_utils  # noqa: E402
from lifelong_moe_jax.models import lm  # noqa: E402
from lifelong_moe_jax.models.config import ModelConfig  # noqa: E402
from lifelong_moe_jax.training import optimizers  # noqa: E402
from lifelong_moe_jax.training import train_state as ts  # noqa: E402

MB = 1e6


def abstract_state_size(gin_file: str, optimizer: str) -> dict[str, float]:
  """Params and optimizer-state sizes of ``gin_file``'s model, from abstract shapes only."""
  gin.clear_config()
  gin_utils.parse_gin([gin_file], [], finalize=False)
  try:
    model = lm.LanguageModel(ModelConfig())
    opt = optimizers.create_optimizer(
      optimizer, optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0)
    )
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0))))
    state = jax.eval_shape(lambda p: ts.create(p, opt.tx, 0), params)
  finally:
    gin.clear_config()
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
  nbytes = lambda tree: sum(
    math.prod(x.shape) * x.dtype.itemsize  # noqa: E731
    for x in jax.tree_util.tree_leaves(tree)
  )
  dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(params)})
  return {
    "params": count(params),
    "params_bytes": nbytes(params),
    "dtypes": ",".join(dtypes),
    "opt_values": count(state.opt_state),
    "opt_bytes": nbytes(state.opt_state),
    "state_bytes": nbytes(state),
  }


def save_checkpoint(directory: str, size_mb: float, leaves: int) -> tuple[str, int]:
  """A synchronous checkpoint (step 1) of ``leaves`` float32 arrays, ``size_mb`` in total."""
  rng = np.random.default_rng(0)
  per_leaf = max(1, int(size_mb * MB / 4 / leaves))
  state = {
    "params": {f"w{i:03d}": rng.standard_normal(per_leaf, dtype=np.float32) for i in range(leaves)}
  }
  ckpt = checkpoint_manager.Checkpointer(
    directory, checkpoints.CheckpointConfig(async_checkpointing=False, max_to_keep=None)
  )
  try:
    ckpt.save(1, state, {"benchmark": "checkpoint_verify"})
  finally:
    ckpt.close()
  return ckpt.step_dir(1), per_leaf * 4 * leaves


def drop_from_page_cache(step_dir: str) -> bool:
  """Asks the kernel to evict the step's files from the page cache; False when unsupported."""
  if not hasattr(os, "posix_fadvise"):
    return False
  for name in checkpoint_manifest.list_files(step_dir) + [checkpoint_manifest.MANIFEST_NAME]:
    fd = os.open(os.path.join(step_dir, name), os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
  return True


def timed(fn, rounds: int, before=None) -> float:
  times = []
  for _ in range(rounds):
    if before is not None:
      before()
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size_mb", type=float, default=512, help="checkpoint size to measure on")
  parser.add_argument("--leaves", type=int, default=32, help="arrays in the measured state")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--workers",
    type=int,
    default=None,
    help="hashing threads (default: as in training, one per CPU up to 8)",
  )
  parser.add_argument("--gin_file", default="models/glam_0.1b_64e.gin")
  parser.add_argument("--optimizer", default="adafactor", choices=optimizers.OPTIMIZERS)
  parser.add_argument("--dir", default=None, help="where to write it (default: a temporary dir)")
  args = parser.parse_args()
  gin_utils.quiet_library_logs()

  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    step_dir, logical = save_checkpoint(tmp, args.size_mb, args.leaves)
    write = lambda: checkpoint_manifest.write_manifest(step_dir, 1, workers=args.workers)  # noqa: E731
    t_write = timed(write, args.rounds)
    manifest = checkpoint_manifest.read_manifest(step_dir)
    disk = manifest["total_bytes"]

    def verify(level: str):
      result = checkpoint_manifest.verify_step(
        step_dir, level=level, workers=args.workers, required=checkpoints.REQUIRED_FILES
      )
      assert result.status == checkpoint_manifest.INTACT, result

    t_warm = timed(lambda: verify("full"), args.rounds)
    cold_ok = drop_from_page_cache(step_dir)
    t_cold = (
      timed(lambda: verify("full"), args.rounds, lambda: drop_from_page_cache(step_dir))
      if cold_ok
      else float("nan")
    )
    t_sizes = timed(lambda: verify("sizes"), args.rounds)

  glam = abstract_state_size(args.gin_file, args.optimizer)
  workers = args.workers or checkpoint_manifest._default_workers()  # pylint: disable=protected-access
  rate = lambda seconds: disk / MB / seconds  # noqa: E731
  print(
    f"checkpoint: {logical / MB:.1f} MB of float32 arrays in {args.leaves} leaves -> "
    f"{disk / MB:.1f} MB on disk in {manifest['num_files']} files "
    f"(orbax zstd ratio {logical / disk:.2f})"
  )
  print(f"sha256 with {workers} worker threads ({os.cpu_count()} CPUs), median of {args.rounds}:")
  print(f"  write manifest        {t_write:8.3f} s  {rate(t_write):8.0f} MB/s")
  print(f"  verify full, warm     {t_warm:8.3f} s  {rate(t_warm):8.0f} MB/s")
  print(f"  verify full, cold     {t_cold:8.3f} s  {rate(t_cold):8.0f} MB/s")
  print(f"  verify sizes only     {t_sizes * 1e3:8.2f} ms")
  state_gb = glam["state_bytes"] / 1e9
  print(
    f"{args.gin_file}: params {glam['params']:,} ({glam['dtypes']}, "
    f"{glam['params_bytes'] / 1e9:.2f} GB) + {args.optimizer} state {glam['opt_values']:,} "
    f"values ({glam['opt_bytes'] / 1e9:.2f} GB) = train state {state_gb:.2f} GB"
  )
  est = lambda seconds: glam["state_bytes"] / (rate(seconds) * MB)  # noqa: E731
  print(f"checksum throughput: {rate(t_warm):.0f} MB/s warm, {rate(t_cold):.0f} MB/s cold")
  print(
    f"estimated full verification of that checkpoint (uncompressed size, an upper bound): "
    f"{est(t_warm):.1f} s warm, {est(t_cold):.1f} s cold; manifest write {est(t_write):.1f} s"
  )


if __name__ == "__main__":
  main()
