r"""Starts N processes of a lifelong_moe_jax CLI on this machine (a local multi-process run).

    python launch/local.py --num_processes=2 --devices_per_process=4 -- train \
        --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin --gin.MODEL_DIR=\"/tmp/run\" ...

Each process gets ``--coordinator_address=localhost:<free port> --process_count=N
--process_index=i`` appended to its arguments and ``--xla_force_host_platform_device_count``
CPU devices (``JAX_PLATFORMS=cpu``); JAX's CPU collectives (gloo) connect them. Every line a
process prints is prefixed with ``[i]`` (stdout to stdout, stderr to stderr). When one process
exits with an error (or is killed) the others are stopped and the launcher exits with that code.
``--dry_run`` prints the environment and the commands it would run, one per process, and exits.
``--devices_per_process`` is one count for every process or a comma-separated count per process
(``4,2``: only useful to see the start-up check refuse processes that disagree).

``<module>`` is one of the CLI short names (``train``, ``lifelong``, ``eval``, ``infer``,
``surgery``, ``demo``) or a full module name (``lifelong_moe_jax.train``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {
  "train": "lifelong_moe_jax.train",
  "lifelong": "lifelong_moe_jax.run_lifelong",
  "run_lifelong": "lifelong_moe_jax.run_lifelong",
  "eval": "lifelong_moe_jax.evaluate",
  "evaluate": "lifelong_moe_jax.evaluate",
  "infer": "lifelong_moe_jax.infer",
  "surgery": "lifelong_moe_jax.surgery",
  "demo": "lifelong_moe_jax.demo",
}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
STOP_GRACE_S = 10.0


def module_name(name: str) -> str:
  """The full module of a CLI short name (``train``) or the name itself if already full."""
  if name in MODULES:
    return MODULES[name]
  if name.startswith("lifelong_moe_jax."):
    return name
  raise SystemExit(
    f"error: unknown module {name!r}; use one of {sorted(set(MODULES))} or a full "
    "module name such as lifelong_moe_jax.train."
  )


def free_port() -> int:
  """A TCP port that was free a moment ago (bound to port 0 and released)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def xla_flags(existing: str, devices: int) -> str:
  """``existing`` XLA_FLAGS with the host device count set to ``devices``."""
  kept = [f for f in existing.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])


def process_env(base: dict[str, str], devices: int) -> dict[str, str]:
  """The environment variables the launcher sets for every process (on top of ``base``)."""
  return {
    "XLA_FLAGS": xla_flags(base.get("XLA_FLAGS", ""), devices),
    "JAX_PLATFORMS": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
  }


def process_commands(
  module: str, args: Sequence[str], num_processes: int, port: int, python: str = sys.executable
) -> list[list[str]]:
  """One command line per process (``python -m module args --coordinator_address ...``)."""
  return [
    [
      python,
      "-m",
      module_name(module),
      *args,
      f"--coordinator_address=localhost:{port}",
      f"--process_count={num_processes}",
      f"--process_index={i}",
    ]
    for i in range(num_processes)
  ]


def _pump(stream: IO[str], out: IO[str], prefix: str, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
      out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to every running process, SIGKILL after ``STOP_GRACE_S``."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + STOP_GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def device_counts(spec: str, num_processes: int) -> list[int]:
  """``--devices_per_process``: one count for every process (``4``) or one per process
  (``4,2``)."""
  try:
    counts = [int(c) for c in spec.split(",")]
  except ValueError:
    counts = []
  if len(counts) == 1:
    counts *= num_processes
  if len(counts) != num_processes or min(counts) < 1:
    raise SystemExit(
      f"error: --devices_per_process={spec!r} must be one positive count or "
      f"{num_processes} comma-separated ones (one per process)."
    )
  return counts


def launch(
  commands: Sequence[Sequence[str]],
  env: dict[str, str] | Sequence[dict[str, str]],
  cwd: str = REPO_ROOT,
) -> int:
  """Runs the processes (``env``: one for all or one per process), prefixing their output;
  returns 0 or the first failure's exit code."""
  envs = [env] * len(commands) if isinstance(env, dict) else list(env)
  lock = threading.Lock()
  procs, pumps = [], []
  for i, cmd in enumerate(commands):
    p = subprocess.Popen(
      list(cmd),
      cwd=cwd,
      env=envs[i],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      bufsize=1,
    )
    procs.append(p)
    with lock:
      sys.stderr.write(f"[launch] process {i} pid {p.pid}\n")
      sys.stderr.flush()
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, out, f"[{i}] ", lock), daemon=True)
      t.start()
      pumps.append(t)

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, forward)

  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, c = failed[0]
        sys.stderr.write(f"[launch] process {i} exited with {c}; stopping the others.\n")
        _stop(procs)
        code = c if c > 0 else 128 - c  # killed by signal s -> 128 + s, like a shell
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.2)
  finally:
    _stop(procs)
    for t in pumps:
      t.join(timeout=5)
  return code


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    raise SystemExit("error: usage: launch/local.py [options] -- <module> [args...]")
  split = argv.index("--")
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument(
    "--devices_per_process",
    default="4",
    help="CPU devices per process (--xla_force_host_platform_device_count): one count, or "
    "one per process separated by commas.",
  )
  parser.add_argument("--port", type=int, default=0, help="Coordinator port (0: a free one).")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="Print the environment and the per-process commands; run nothing.",
  )
  opts = parser.parse_args(argv[:split])
  rest = argv[split + 1 :]
  if not rest:
    raise SystemExit("error: name the module to run after '--' (e.g. train).")
  if opts.num_processes < 1:
    raise SystemExit("error: --num_processes must be >= 1.")
  devices = device_counts(opts.devices_per_process, opts.num_processes)
  port = opts.port or free_port()
  commands = process_commands(rest[0], rest[1:], opts.num_processes, port)
  extra_envs = [process_env(dict(os.environ), n) for n in devices]
  if opts.dry_run:
    shown = str(devices[0]) if len(set(devices)) == 1 else "/".join(map(str, devices))
    print(
      f"# {opts.num_processes} processes x {shown} CPU devices, "
      f"coordinator localhost:{port}, cwd {REPO_ROOT}"
    )
    for i, cmd in enumerate(commands):
      env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(extra_envs[i].items()))
      print(f"[{i}] {env} {shlex.join(cmd)}")
    return 0
  return launch(commands, [dict(os.environ, **e) for e in extra_envs])


if __name__ == "__main__":
  sys.exit(main())
