"""Multi-process start-up: ``jax.distributed.initialize``, cluster detection, agreement, barriers.

``initialize`` is what every CLI runs (through ``gin_utils.apply_runtime_flags``) before JAX
touches a device:

* explicit flags (``--coordinator_address`` with ``--process_count`` / ``--process_index``):
  ``jax.distributed.initialize`` with them (what ``launch/local.py`` passes);
* no flags, but an environment that ``jax.distributed.initialize()`` detects by itself (a SLURM
  job step with several tasks, a multi-host Cloud TPU slice, Open MPI): it is called without
  arguments, and JAX reads the coordinator, process count and index from the environment.
  Detection reads environment variables only (no metadata-server queries);
  ``LIFELONG_MOE_DISTRIBUTED=1`` forces the call (e.g. on TPU VMs where only the metadata server
  knows the topology; ``launch/tpu_pod.py`` sets it), ``=0`` switches detection off;
* otherwise a single-process run.

On CPU the multi-process collectives are JAX's gloo implementation
(``jax_cpu_collectives_implementation = 'gloo'``, set explicitly). After initialisation every
process publishes a fingerprint of its command line (minus ``--process_index``), the contents
of its gin files and its local device count in the coordination service, and each process
compares them: processes that disagree stop with ``ProcessMismatchError`` before any work.
A coordinator that cannot be reached within ``LIFELONG_MOE_COORDINATOR_TIMEOUT_S`` (default
300 s) raises ``CoordinatorUnreachableError`` (exit code 1) instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Mapping, Sequence

DISTRIBUTED_ENV = "LIFELONG_MOE_DISTRIBUTED"
TIMEOUT_ENV = "LIFELONG_MOE_COORDINATOR_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300
BARRIER_TIMEOUT_S = 1800
_barrier_count = 0
_SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


class ProcessMismatchError(ValueError):
  """The processes of one run were started with different settings (exit code 2)."""


class CoordinatorUnreachableError(RuntimeError):
  """The coordinator did not answer within the timeout (exit code 1)."""


def detect_environment(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process environment ``jax.distributed.initialize()`` would detect, or None.

  Returns one of ``"slurm"`` (a job step with more than one task), ``"tpu"`` (a multi-host
  Cloud TPU slice: ``TPU_WORKER_HOSTNAMES`` with several hosts, or a Megascale coordinator),
  ``"ompi"`` (Open MPI's ``mpirun``), ``"forced"`` (``LIFELONG_MOE_DISTRIBUTED=1``); None when
  none is present or ``LIFELONG_MOE_DISTRIBUTED=0``.
  """
  env = os.environ if env is None else env
  setting = env.get(DISTRIBUTED_ENV, "").strip().lower()
  if setting in ("0", "false", "no", "off"):
    return None
  if setting in ("1", "true", "yes", "on", "force"):
    return "forced"
  if all(v in env for v in _SLURM_VARS) and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "ompi"
  return None


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """The GPUs a SLURM task owns when it runs one task per node, else None (JAX's default).

  JAX's SLURM detection assumes one process per GPU (it gives each process only GPU
  ``SLURM_LOCALID``); with one task per node the process must own all the node's GPUs
  (``CUDA_VISIBLE_DEVICES`` as set by ``srun --gpus-per-task``).
  """
  env = os.environ if env is None else env
  try:
    per_node = int(str(env.get("SLURM_NTASKS_PER_NODE", "")).split("(")[0] or 0)
    if not per_node and env.get("SLURM_NTASKS") and env.get("SLURM_JOB_NUM_NODES"):
      per_node = int(env["SLURM_NTASKS"]) // max(1, int(env["SLURM_JOB_NUM_NODES"]))
  except ValueError:
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if per_node != 1 or len(visible) < 2:
    return None
  return list(range(len(visible)))


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until ``host:port`` accepts TCP connections.

  jaxlib terminates the process (no Python exception) when the coordinator does not answer, so a
  non-coordinator process checks first.

  Raises:
    CoordinatorUnreachableError: still refused after ``timeout_s``.
  """
  import socket  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address={address!r} must be host:port.")
  deadline = time.monotonic() + timeout_s
  last = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      last = e
      time.sleep(0.5)
  raise CoordinatorUnreachableError(
    f"Could not connect to the coordinator ({address}) within {timeout_s:g} s "
    f"(${TIMEOUT_ENV}): {last}. Check that process 0 is running and listening there, the "
    "address and port, and that every process has the same --process_count."
  )


def _timeout_s() -> int:
  try:
    return max(1, int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
  except ValueError:
    return DEFAULT_TIMEOUT_S


def initialize(
  coordinator_address: str | None = None,
  process_count: int | None = None,
  process_index: int | None = None,
  argv: Sequence[str] | None = None,
) -> str | None:
  """Starts the multi-process runtime when asked to or when the environment calls for it.

  Args:
    coordinator_address: ``host:port`` of process 0 (explicit mode).
    process_count / process_index: required with ``coordinator_address``.
    argv: the command line whose fingerprint the processes compare (default ``sys.argv``).
  Returns:
    None for a single-process run, else how it was started (``"flags"`` or the detected
    environment).
  Raises:
    ValueError: inconsistent flags.
    CoordinatorUnreachableError: the coordinator did not answer in time.
    ProcessMismatchError: the processes disagree on their settings or device counts.
  """
  if not coordinator_address:
    if process_count not in (None, 1) or process_index not in (None, 0):
      raise ValueError("--process_count/--process_index need --coordinator_address.")
    mode = detect_environment()
    if mode is None:
      return None
    kwargs = {}
    if mode == "slurm" and slurm_local_device_ids() is not None:
      kwargs["local_device_ids"] = slurm_local_device_ids()
  else:
    if process_count is None or process_index is None:
      raise ValueError("--coordinator_address needs --process_count and --process_index.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"--process_index={process_index} must be in [0, {process_count}).")
    mode = "flags"
    if process_index != 0:
      wait_for_coordinator(coordinator_address, _timeout_s())
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=process_count, process_id=process_index
    )
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = _timeout_s()
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  except Exception as e:  # pylint: disable=broad-except - jaxlib raises its own runtime errors.
    where = coordinator_address or f"the {mode} environment's coordinator"
    raise CoordinatorUnreachableError(
      f"Could not connect to the coordinator ({where}) within {timeout} s "
      f"(${TIMEOUT_ENV}): {str(e).splitlines()[0] if str(e) else type(e).__name__}. Check "
      "that process 0 is running, the address and port, and that every process has the same "
      "--process_count."
    ) from e
  check_processes_agree(run_fingerprint(argv))
  return mode


def run_fingerprint(argv: Sequence[str] | None = None) -> dict[str, str | int]:
  """What must be equal on every process: the command line without ``--process_index``, the
  contents of its ``--gin_file``s and the local device count."""
  import jax  # pylint: disable=import-outside-toplevel

  argv = list(sys.argv if argv is None else argv)
  args = [a for a in argv[1:] if not a.startswith("--process_index")]
  gin_digest = hashlib.sha256()
  for arg in args:
    if arg.startswith("--gin_file="):
      path = arg.split("=", 1)[1]
      for folder in (
        "",
        os.getcwd(),
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin"),
      ):
        candidate = os.path.join(folder, path) if folder else path
        if os.path.isfile(candidate):
          with open(candidate, "rb") as f:
            gin_digest.update(f.read())
          break
  return {
    "args": hashlib.sha256("\0".join(args).encode()).hexdigest()[:16],
    "gin_files": gin_digest.hexdigest()[:16],
    "local_devices": jax.local_device_count(),
  }


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel

  return jax_distributed.global_state.client


def check_processes_agree(fingerprint: Mapping[str, str | int]) -> None:
  """Compares ``fingerprint`` across processes through the coordination service.

  Raises:
    ProcessMismatchError: naming the processes and the fields that differ.
  """
  import jax  # pylint: disable=import-outside-toplevel

  client = _client()
  if client is None or jax.process_count() == 1:
    return
  me = jax.process_index()
  client.key_value_set(f"lifelong_moe/fingerprint/{me}", json.dumps(dict(fingerprint)))
  timeout_ms = _timeout_s() * 1000
  mine = dict(fingerprint)
  problems = []
  for other in range(jax.process_count()):
    theirs = json.loads(
      client.blocking_key_value_get(f"lifelong_moe/fingerprint/{other}", timeout_ms)
    )
    diffs = [k for k in mine if theirs.get(k) != mine[k]]
    if diffs:
      problems.append(
        f"process {other} differs from process {me} in "
        + ", ".join(
          f"{k} (process {other}: {theirs.get(k)}, process {me}: {mine[k]})" for k in diffs
        )
      )
  if problems:
    raise ProcessMismatchError(
      "The processes of this run disagree: " + "; ".join(problems) + ". Start every process "
      "with the same arguments (only --process_index differs), the same gin files and the "
      "same number of local devices."
    )


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Waits until every process reaches ``name`` (coordination service; no-op for 1 process).

  Used before the first collective of a compiled step: gloo connects the processes lazily with a
  30 s deadline, which processes that compiled (or restored) at different speeds can miss.
  """
  import jax  # pylint: disable=import-outside-toplevel

  client = _client()
  if client is None or jax.process_count() == 1:
    return
  global _barrier_count
  _barrier_count += 1
  client.wait_at_barrier(f"lifelong_moe/{name}/{_barrier_count}", timeout_s * 1000)


def to_host(x):
  """``x`` as a numpy array on every process; a global ``jax.Array`` that spans several processes
  is all-gathered first (``multihost_utils.process_allgather``), so every process sees the full
  value (e.g. scores that process 0 writes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
