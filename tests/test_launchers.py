"""Launchers' ``--dry_run`` output (local, TPU pod via gcloud and xpk, SLURM), cluster detection
and the start-up errors of multi-process runs (disagreeing processes, unreachable coordinator)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest

from lifelong_moe_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _run(cmd, env=None, timeout=120):
  return subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
  )


def test_local_dry_run():
  proc = _run(
    [
      PY,
      "launch/local.py",
      "--num_processes=2",
      "--devices_per_process=4",
      "--port=23456",
      "--dry_run",
      "--",
      "train",
      "--gin_file=models/tiny.gin",
    ]
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == f"# 2 processes x 4 CPU devices, coordinator localhost:23456, cwd {REPO}"
  for i in range(2):
    assert lines[1 + i] == (
      f"[{i}] CUDA_VISIBLE_DEVICES='' JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 "
      f"XLA_FLAGS=--xla_force_host_platform_device_count=4 {PY} -m "
      "lifelong_moe_jax.train --gin_file=models/tiny.gin "
      f"--coordinator_address=localhost:23456 --process_count=2 --process_index={i}"
    )
  assert len(lines) == 3
  bad = _run([PY, "launch/local.py", "--dry_run", "--", "nonsense"])
  assert bad.returncode != 0 and "unknown module 'nonsense'" in bad.stderr


GLAM_ARGS = [
  "--gin_file=models/glam_0.1b_64e.gin",
  "--gin_file=runs/pretrain.gin",
  '--gin.MODEL_DIR="gs://my-bucket/glam_0.1b"',
  "--gin.MeshConfig.data=2",
  "--gin.MeshConfig.expert=64",
]
RUN = (
  "cd ~/lifelong-moe-jax && LIFELONG_MOE_DISTRIBUTED=1 python3 -m lifelong_moe_jax.train "
  + shlex.join(GLAM_ARGS)
)
INSTALL = (
  "cd ~/lifelong-moe-jax && python3 -m pip install -q -r requirements.lock && "
  "python3 -m pip install -q 'jax[tpu]==0.10.2' -f "
  "https://storage.googleapis.com/jax-releases/libtpu_releases.html && "
  "python3 -m pip install -q --no-deps -e ."
)


def test_tpu_pod_gcloud_dry_run_v5p_256():
  proc = _run(
    [
      PY,
      "launch/tpu_pod.py",
      "--tpu=glam-v5p",
      "--zone=us-east5-a",
      "--accelerator_type=v5p-256",
      "--dry_run",
      "--",
      "train",
      *GLAM_ARGS,
    ]
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == (
    "# 1 x v5p-256: 128 chips, 32 workers x 4 chips; every worker runs the same "
    "command, jax.distributed.initialize() assigns process ids 0..31"
  )
  ssh = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "glam-v5p",
    "--zone=us-east5-a",
    "--worker=all",
  ]
  assert [shlex.split(line) for line in lines[1:]] == [
    ssh + [f"--command={INSTALL}"],
    ssh + [f"--command={RUN}"],
  ]


def test_tpu_pod_xpk_dry_run_two_slices():
  proc = _run(
    [
      PY,
      "launch/tpu_pod.py",
      "--mode=xpk",
      "--cluster=my-gke",
      "--num_slices=2",
      "--accelerator_type=v5p-256",
      "--docker_image=gcr.io/p/lifelong-moe:latest",
      "--repo_dir=/app",
      "--dry_run",
      "--",
      "train",
      *GLAM_ARGS,
      "--gin.MeshConfig.dcn_data=2",
    ]
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("# 2 x v5p-256: 256 chips, 64 workers x 4 chips")
  cmd = shlex.split(lines[1])
  assert cmd[:8] == [
    "xpk",
    "workload",
    "create",
    "--cluster=my-gke",
    "--workload=lifelong-moe",
    "--tpu-type=v5p-256",
    "--num-slices=2",
    "--docker-image=gcr.io/p/lifelong-moe:latest",
  ]
  script = cmd[8].removeprefix("--command=")
  assert script.startswith("cd /app && python3 -m pip install -q -r requirements.lock")
  assert script.endswith(
    "LIFELONG_MOE_DISTRIBUTED=1 python3 -m lifelong_moe_jax.train "
    + shlex.join(GLAM_ARGS + ["--gin.MeshConfig.dcn_data=2"])
  )


def test_slurm_dry_run_4_nodes_x_8_gpus():
  args = [
    "--gin_file=models/glam_1.7b_64e.gin",
    "--gin_file=runs/pretrain.gin",
    '--gin.MODEL_DIR="/shared/glam_1.7b"',
    "--gin.MeshConfig.data=4",
    "--gin.MeshConfig.expert=8",
    "--gin.MeshConfig.dcn_data=4",
  ]
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env["LIFELONG_MOE_REPO_DIR"] = "/shared/lifelong-moe-jax"
  proc = _run(["bash", "launch/slurm_gpu.sbatch", "--dry_run", "train", *args], env=env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == (
    "# 4 nodes x 1 tasks (8 GPUs per node): 4 processes; jax.distributed.initialize() detects SLURM"
  )
  assert shlex.split(lines[1]) == [
    "srun",
    "--nodes=4",
    "--ntasks=4",
    "--ntasks-per-node=1",
    "--gpus-per-task=8",
    "--kill-on-bad-exit=1",
    "--chdir=/shared/lifelong-moe-jax",
    "env",
    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
    "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
    "NCCL_DEBUG=WARN",
    "TF_CPP_MIN_LOG_LEVEL=2",
    "NO_GCE_CHECK=true",
    "python3",
    "-m",
    "lifelong_moe_jax.train",
    *args,
  ]
  assert lines[2:] == [
    f"task {t}: node {t} GPUs 0-7 SLURM_PROCID={t} SLURM_LOCALID=0" for t in range(4)
  ]


@pytest.mark.parametrize(
  "env, expected",
  [
    ({}, None),
    (
      {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-4]",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
      },
      "slurm",
    ),
    (
      {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n1",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
      },
      None,
    ),  # a single-task job step
    ({"SLURM_JOB_ID": "7"}, None),  # salloc shell, not an srun step
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, "ompi"),
    ({"LIFELONG_MOE_DISTRIBUTED": "1"}, "forced"),
    ({"LIFELONG_MOE_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "w0,w1"}, None),
  ],
)
def test_detect_environment(env, expected):
  assert distributed.detect_environment(env) == expected


def test_slurm_one_task_per_node_owns_all_gpus():
  env = {"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  assert distributed.slurm_local_device_ids(env) == list(range(8))
  assert distributed.slurm_local_device_ids(dict(env, SLURM_NTASKS_PER_NODE="8")) is None
  assert distributed.slurm_local_device_ids(
    {"SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "4", "CUDA_VISIBLE_DEVICES": "0,1"}
  ) == [0, 1]


def test_flag_errors():
  with pytest.raises(ValueError, match="need --coordinator_address"):
    distributed.initialize(None, 2, 1)
  with pytest.raises(ValueError, match="needs --process_count and --process_index"):
    distributed.initialize("localhost:1", None, 0)
  with pytest.raises(ValueError, match=r"--process_index=2 must be in \[0, 2\)"):
    distributed.initialize("localhost:1", 2, 2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cli_env(devices: int = 4) -> dict[str, str]:
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    NO_GCE_CHECK="true",
    TF_CPP_MIN_LOG_LEVEL="2",
    LIFELONG_MOE_COORDINATOR_TIMEOUT_S="20",
  )
  env.pop("LIFELONG_MOE_DISTRIBUTED", None)
  return env


TRAIN = [
  PY,
  "-m",
  "lifelong_moe_jax.train",
  "--gin_file=models/tiny.gin",
  "--gin_file=runs/pretrain.gin",
  '--gin.MODEL_DIR="/nonexistent/never_written"',
  '--gin.MIXTURE_OR_TASK_NAME="lifelong_all"',
  "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
  "--gin.TRAIN_STEPS=2",
  "--gin.BATCH_SIZE=8",
]


def test_unreachable_coordinator_is_a_clear_error():
  proc = _run(
    TRAIN
    + [f"--coordinator_address=localhost:{_free_port()}", "--process_count=2", "--process_index=1"],
    env=dict(_cli_env(), LIFELONG_MOE_COORDINATOR_TIMEOUT_S="5"),
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "error: Could not connect to the coordinator (localhost:" in proc.stderr
  assert "within 5 s" in proc.stderr
  assert not os.path.exists("/nonexistent/never_written")


def test_processes_that_disagree_stop_before_any_work(tmp_path):
  port = _free_port()
  model_dir = tmp_path / "run"
  base = [a.replace("/nonexistent/never_written", str(model_dir)) for a in TRAIN]
  procs = [
    subprocess.Popen(
      base
      + extra
      + [f"--coordinator_address=localhost:{port}", "--process_count=2", f"--process_index={i}"],
      cwd=REPO,
      env=_cli_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, extra in enumerate([[], ["--gin.TRAIN_STEPS=3"]])
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err[-3000:]
    assert "error: The processes of this run disagree: process" in err
    assert "args (" in err
  assert not model_dir.exists()
