r"""Runs a lifelong_moe_jax CLI on every worker of a Cloud TPU pod slice (or through xpk on GKE).

    python launch/tpu_pod.py --tpu=my-v5p --zone=us-east5-a --accelerator_type=v5p-256 -- train \
        --gin_file=models/glam_0.1b_64e.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR=\"gs://bucket/glam\" --gin.MeshConfig.data=2 --gin.MeshConfig.expert=64 ...

``--mode=gcloud`` (default, TPU VMs): two ``gcloud compute tpus tpu-vm ssh --worker=all`` steps:
first the pinned stack (``requirements.lock``, then ``jax[tpu]`` of the same JAX version and this
package), then the same command on every worker. ``--mode=xpk`` (GKE): one ``xpk workload
create`` whose container runs the install and the command on every host of ``--num_slices``
slices. Every worker runs the identical command line with ``LIFELONG_MOE_DISTRIBUTED=1``, so
``jax.distributed.initialize()`` finds the coordinator, process count and index itself (no
per-worker flags). ``gs://`` paths work for MODEL_DIR and ``--tfds_data_dir`` (orbax and TFDS read
them). ``--dry_run`` prints the commands and exits.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Sequence

CHIPS_PER_HOST = {"v4": 4, "v5p": 4, "v5litepod": 4, "v5e": 4, "v6e": 4}
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}
JAX_VERSION_RE = re.compile(r"^jax==(\S+)$", re.M)
MODULES = {
  "train": "lifelong_moe_jax.train",
  "lifelong": "lifelong_moe_jax.run_lifelong",
  "eval": "lifelong_moe_jax.evaluate",
  "infer": "lifelong_moe_jax.infer",
  "surgery": "lifelong_moe_jax.surgery",
}
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def slice_topology(accelerator_type: str) -> tuple[int, int]:
  """(chips, hosts) of one slice, e.g. v5p-256 -> (128 chips, 32 hosts of 4 chips)."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
  if not m or m.group(1) not in CHIPS_PER_HOST:
    raise SystemExit(f"error: unknown --accelerator_type {accelerator_type!r} (e.g. v5p-256).")
  kind, cores = m.group(1), int(m.group(2))
  chips = cores // CORES_PER_CHIP[kind]
  return chips, max(1, chips // CHIPS_PER_HOST[kind])


def jax_version(lock_path: str) -> str:
  with open(lock_path, encoding="utf-8") as f:
    m = JAX_VERSION_RE.search(f.read())
  if not m:
    raise SystemExit(f"error: no jax==VERSION line in {lock_path}.")
  return m.group(1)


def install_script(repo_dir: str, jax_ver: str) -> str:
  """Shell commands that install the pinned stack on a worker (run from ``repo_dir``)."""
  return (
    f"cd {repo_dir} && python3 -m pip install -q -r requirements.lock && "
    f"python3 -m pip install -q 'jax[tpu]=={jax_ver}' -f {LIBTPU_INDEX} && "
    "python3 -m pip install -q --no-deps -e ."
  )


def run_script(repo_dir: str, module: str, args: Sequence[str]) -> str:
  """The command every worker runs (identical on all workers)."""
  mod = MODULES.get(module, module)
  return f"cd {repo_dir} && LIFELONG_MOE_DISTRIBUTED=1 python3 -m {mod} " + shlex.join(list(args))


def gcloud_commands(
  opts: argparse.Namespace, module: str, args: Sequence[str], jax_ver: str
) -> list[list[str]]:
  base = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    opts.tpu,
    f"--zone={opts.zone}",
    "--worker=all",
  ]
  if opts.project:
    base.append(f"--project={opts.project}")
  cmds = []
  if opts.sync_code:
    cmds.append(
      [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "--recurse",
        "--worker=all",
        f"--zone={opts.zone}",
        *([f"--project={opts.project}"] if opts.project else []),
        ".",
        f"{opts.tpu}:{opts.repo_dir}",
      ]
    )
  cmds.append(base + [f"--command={install_script(opts.repo_dir, jax_ver)}"])
  cmds.append(base + [f"--command={run_script(opts.repo_dir, module, args)}"])
  return cmds


def xpk_commands(
  opts: argparse.Namespace, module: str, args: Sequence[str], jax_ver: str
) -> list[list[str]]:
  script = (
    install_script(opts.repo_dir, jax_ver)
    + " && "
    + run_script(opts.repo_dir, module, args).split(" && ", 1)[1]
  )
  cmd = [
    "xpk",
    "workload",
    "create",
    f"--cluster={opts.cluster}",
    f"--workload={opts.workload}",
    f"--tpu-type={opts.accelerator_type}",
    f"--num-slices={opts.num_slices}",
    f"--docker-image={opts.docker_image}",
    f"--command={script}",
  ]
  if opts.project:
    cmd.append(f"--project={opts.project}")
  if opts.zone:
    cmd.append(f"--zone={opts.zone}")
  return [cmd]


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    raise SystemExit("error: usage: launch/tpu_pod.py [options] -- <module> [args...]")
  split = argv.index("--")
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("gcloud", "xpk"), default="gcloud")
  parser.add_argument("--tpu", help="TPU VM name (gcloud mode).")
  parser.add_argument("--zone", default=None)
  parser.add_argument("--project", default=None)
  parser.add_argument("--accelerator_type", default="v5p-256")
  parser.add_argument("--num_slices", type=int, default=1, help="Slices (xpk multi-slice).")
  parser.add_argument("--cluster", help="GKE cluster (xpk mode).")
  parser.add_argument("--workload", default="lifelong-moe", help="xpk workload name.")
  parser.add_argument("--docker_image", default="python:3.11", help="xpk base image.")
  parser.add_argument(
    "--repo_dir",
    default="~/lifelong-moe-jax",
    help="Where the repository lives on every worker (xpk: in the image).",
  )
  parser.add_argument(
    "--sync_code",
    action="store_true",
    help="gcloud mode: copy this checkout to every worker first (scp).",
  )
  parser.add_argument("--lock", default="requirements.lock")
  parser.add_argument("--dry_run", action="store_true")
  opts = parser.parse_args(argv[:split])
  rest = argv[split + 1 :]
  if not rest:
    raise SystemExit("error: name the module to run after '--' (e.g. train).")
  if opts.mode == "gcloud" and not (opts.tpu and opts.zone):
    raise SystemExit("error: gcloud mode needs --tpu and --zone.")
  if opts.mode == "xpk" and not opts.cluster:
    raise SystemExit("error: xpk mode needs --cluster.")
  chips, hosts = slice_topology(opts.accelerator_type)
  jax_ver = jax_version(opts.lock)
  make = gcloud_commands if opts.mode == "gcloud" else xpk_commands
  commands = make(opts, rest[0], rest[1:], jax_ver)
  header = (
    f"# {opts.num_slices} x {opts.accelerator_type}: {chips * opts.num_slices} chips, "
    f"{hosts * opts.num_slices} workers x {chips // hosts} chips; every worker runs the "
    "same command, jax.distributed.initialize() assigns process ids "
    f"0..{hosts * opts.num_slices - 1}"
  )
  if opts.dry_run:
    print(header)
    for cmd in commands:
      print(shlex.join(cmd))
    return 0
  import subprocess  # pylint: disable=import-outside-toplevel

  print(header, flush=True)
  for cmd in commands:
    print("+ " + shlex.join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code:
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
