"""launch/multinode.sh and launch/slurm.sbatch: valid bash, and the accelerate command they build parses (with
accelerate's own parser) to the nodes, ranks and processes asked for, with train.py flags train.py accepts."""
import os
import shlex
import subprocess

import pytest
from accelerate.commands.launch import launch_command_parser

import train
from conftest import REPO_ROOT

SCRIPTS = ("launch/multinode.sh", "launch/slurm.sbatch")
TRAIN_FLAGS = ["--exp-name", "big run", "--data-dir", "/shared/data", "--fsdp", "--mixed-precision", "bf16"]


def dry_run(script, env, path_prefix=None):
    env = {**os.environ, "DRY_RUN": "1", **env}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    result = subprocess.run(["bash", script, *TRAIN_FLAGS], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:2] == ["accelerate", "launch"]
    return launch_command_parser().parse_args(argv[2:])


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_multinode_command_parses():
    launch = dry_run("launch/multinode.sh", {"NUM_MACHINES": "2", "MACHINE_RANK": "1", "GPUS_PER_NODE": "8",
                                             "MAIN_PROCESS_IP": "10.0.0.1"})
    assert (launch.num_machines, launch.machine_rank, launch.num_processes) == (2, 1, 16)
    assert (launch.main_process_ip, launch.main_process_port, launch.multi_gpu) == ("10.0.0.1", 29500, True)
    assert launch.training_script == "train.py" and launch.training_script_args == TRAIN_FLAGS
    args = train.parse_args(launch.training_script_args)
    assert args.fsdp and args.exp_name == "big run"


def test_multinode_names_what_is_missing():
    result = subprocess.run(["bash", "launch/multinode.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "NUM_MACHINES": "2", "MACHINE_RANK": "0"})
    assert result.returncode != 0 and "MAIN_PROCESS_IP" in result.stderr


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """srun and scontrol replaced by stubs: srun runs its command as the task of node 1 would."""
    (tmp_path / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (tmp_path / "scontrol").write_text('#!/usr/bin/env bash\nprintf "gpu-a\\ngpu-b\\n"\n')
    for stub in ("srun", "scontrol"):
        (tmp_path / stub).chmod(0o755)
    launch = dry_run("launch/slurm.sbatch", {"SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2",
                                              "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4",
                                              "SLURM_SUBMIT_DIR": str(REPO_ROOT)}, path_prefix=tmp_path)
    assert (launch.num_machines, launch.machine_rank, launch.num_processes) == (2, 1, 8)
    assert launch.main_process_ip == "gpu-a" and launch.training_script_args == TRAIN_FLAGS
