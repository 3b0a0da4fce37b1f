"""Two machines on this host: the shipped SLURM script (configuration/slurm/pretrain.sbatch) starts one `accelerate
launch` per node on 127.0.0.1, with machine ranks 0 and 1, one CPU process each (gloo), as a cluster would.

`srun` and `scontrol` are stand-ins on PATH: `scontrol show hostnames` prints the node list, and `srun` starts the
per-node command once per node with that node's SLURM_NODEID, each in its own session with its own log, so a test can
kill or freeze one "node" (its launcher, torchrun and worker). A spy imported at each worker's start-up
(sitecustomize) records the images every rank trained on and the weights it ended with; the runs are otherwise the
real script.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from safetensors.torch import load_file
from test_run_pretraining import config_file, free_port, png_bytes, write_dataset

SBATCH = REPO_ROOT / "configuration" / "slurm" / "pretrain.sbatch"
IMAGES = 64
# 64 images, 8 per rank and step on 2 ranks: 4 steps an epoch; a checkpoint every 3 steps lands inside an epoch.
COMMON = ("--max_train_steps", "24", "--checkpointing_steps", "3", "--informed_masking_start_step", "5")
__all__ = ["config_file"]  # a fixture shared with test_run_pretraining

SRUN = """#!/bin/bash
# srun stand-in: the command once per node (SRUN_NODE_IDS, default 0 .. SLURM_NNODES-1), each in its own session
while [[ $1 == --* ]]; do shift; done
pids=()
for id in ${SRUN_NODE_IDS:-$(seq 0 $((SLURM_NNODES - 1)))}; do
  SLURM_NODEID=$id SLURM_PROCID=$id SLURM_LOCALID=0 setsid "$@" > "$SRUN_LOG_DIR/node$id.log" 2>&1 &
  echo $! > "$SRUN_LOG_DIR/node$id.pid"
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/bin/bash
# scontrol stand-in: `scontrol show hostnames a,b` prints one name a line
tr ',' '\\n' <<< "$3"
"""
SPY = """
import os

if os.environ.get("SGMAE_SPY_DIR") and "LOCAL_RANK" in os.environ:  # torchrun's workers only
    from pathlib import Path

    from safetensors.torch import save_file

    from sgmae_training import engine

    folder, real_train = Path(os.environ["SGMAE_SPY_DIR"]), engine.train

    def train(accelerator, model, optimizer, scheduler, epoch_batches, *args, **kwargs):
        rank = accelerator.process_index

        def recorded(state):
            for batch in epoch_batches(state):
                colours = batch["pixel_values"].mean(dim=(2, 3)).tolist()  # one uniform colour per image
                with open(folder / f"rank{rank}-images.txt", "a") as file:
                    file.writelines(f"{state.epoch} " + " ".join(f"{v:.3f}" for v in c) + "\\n" for c in colours)
                yield batch

        state = real_train(accelerator, model, optimizer, scheduler, recorded, *args, **kwargs)
        weights = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, folder / f"rank{rank}-weights.safetensors")
        return state

    engine.train = train
"""


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of one colour each, all different, so a batch tells which images it holds after any crop and flip."""
    images = [
        png_bytes(Image.fromarray(np.full((32, 32, 3), (4 * i, 255 - 4 * i, 37 * i % 256), dtype=np.uint8)))
        for i in range(IMAGES)
    ]
    return write_dataset(tmp_path_factory.mktemp("colours"), images)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stubs")
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("sitecustomize.py", SPY)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


class Job:
    """One submission of the SLURM script: two nodes on 127.0.0.1, their logs and spy records in `folder`."""

    def __init__(self, stubs: Path, folder: Path, script_args: list[str], **env: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.env = dict(
            os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
            PATH=f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=f"{stubs}:{REPO_ROOT}",
            SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_NNODES="2", SLURM_GPUS_PER_NODE="1",
            SRUN_LOG_DIR=str(folder), SGMAE_SPY_DIR=str(folder),
            GLOO_SOCKET_IFNAME="lo",  # gloo's connections on loopback too, whatever this host's name resolves to
        )  # fmt: skip
        self.env.update(env)
        self.process = subprocess.Popen(
            ["bash", str(SBATCH), *script_args], cwd=REPO_ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill_all()

    def node_processes(self, node: int) -> list[psutil.Process]:
        """The node's task (its launcher), torchrun's agent and the worker: torchrun starts workers in sessions of
        their own, so they are found as descendants rather than by process group."""
        task = psutil.Process(int((self.folder / f"node{node}.pid").read_text()))
        return [task, *task.children(recursive=True)]

    def kill_all(self) -> None:
        """Leave nothing running after a test, even after a failed assertion."""
        for node in (0, 1):
            if (self.folder / f"node{node}.pid").exists():
                try:
                    for process in self.node_processes(node):
                        process.kill()
                except psutil.NoSuchProcess:
                    pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log(self, node: int) -> str:
        return (self.folder / f"node{node}.log").read_text()

    def images(self, rank: int) -> dict[int, list[str]]:
        """The images (by colour) that `rank` trained on, by epoch."""
        seen: dict[int, list[str]] = {}
        for line in (self.folder / f"rank{rank}-images.txt").read_text().splitlines():
            epoch, colour = line.split(" ", 1)
            seen.setdefault(int(epoch), []).append(colour)
        return seen

    def weights(self, rank: int) -> dict[str, torch.Tensor]:
        return load_file(self.folder / f"rank{rank}-weights.safetensors")


def pretraining_args(dataset: Path, output_dir: Path, config_file: str, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(dataset), "--config_name", config_file, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8", "--max_eval_samples", "8", "--dataloader_num_workers", "0",
        "--logging_steps", "3", "--seed", "3", "--mixed_precision", "no", *COMMON, *extra,
    ]  # fmt: skip


def assert_equal_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def straight(stubs, colour_dataset, config_file, tmp_path_factory) -> Job:
    """An uninterrupted two-machine run."""
    folder = tmp_path_factory.mktemp("straight")
    job = Job(stubs, folder, pretraining_args(colour_dataset, folder / "out", config_file))
    assert job.wait() == 0, job.process.stdout.read() + job.log(0)[-3000:] + job.log(1)[-3000:]
    return job


def test_two_machines_train_disjoint_shards_to_the_same_weights(straight):
    output = straight.folder / "out"
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["num_processes"] == 2 and summary["step"] == 24 and summary["samples_seen"] == 24 * 16
    assert "2 nodes x 1 processes, main node 127.0.0.1:" in straight.process.stdout.read()
    first, second = straight.images(0), straight.images(1)
    assert sorted(first) == sorted(second) == list(range(6))  # 24 steps of 4 an epoch
    for epoch in first:  # each epoch: every image once, on one of the two machines
        assert len(first[epoch]) == len(second[epoch]) == IMAGES // 2
        assert not set(first[epoch]) & set(second[epoch])
        assert len(set(first[epoch]) | set(second[epoch])) == IMAGES
    assert first[0] != first[1]  # reshuffled every epoch
    assert_equal_weights(straight.weights(1), straight.weights(0), "rank 1 vs rank 0")
    assert_equal_weights(load_file(output / "model.safetensors"), straight.weights(0), "saved model vs rank 0")


@pytest.mark.parametrize("killed", [1, 0], ids=["other-node-killed", "main-node-killed"])
def test_a_killed_node_stops_the_other_in_one_line_and_both_resume_exactly(
    straight, stubs, colour_dataset, config_file, tmp_path, killed
):
    """Either node: the main one also holds torchrun's rendezvous store."""
    survivor = 1 - killed
    output = tmp_path / "out"
    job = Job(stubs, tmp_path / "first", pretraining_args(colour_dataset, output, config_file))
    deadline = time.time() + 180
    while not (output / "checkpoint-3" / "trainer_state.json").exists():
        assert job.process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    for process in job.node_processes(killed):  # the whole machine goes: launcher, torchrun agent, worker
        process.kill()
    killed_at = time.time()
    psutil.Process(int((job.folder / f"node{survivor}.pid").read_text())).wait(timeout=120)
    took = time.time() - killed_at
    assert job.wait() != 0
    assert not (output / "checkpoint-24").exists(), "the run finished before it could be killed"
    log = job.log(survivor)
    lines = [line for line in log.splitlines() if line.startswith(f"error: process {survivor} lost contact")]
    assert len(lines) == 1, log[-5000:]
    assert "Connection reset by peer" in lines[0] or "Connection closed by peer" in lines[0]
    assert f"--resume_from_checkpoint latest to continue from the newest checkpoint in {output}" in lines[0]
    assert f"[rank{survivor}]: Traceback" not in log  # the worker's own stack is replaced by the line
    assert took < 60, f"the surviving node took {took:.1f}s to stop"
    print(f"node {survivor} stopped {took:.1f}s after node {killed} was killed")

    resumed = Job(
        stubs,
        tmp_path / "resumed",
        pretraining_args(colour_dataset, output, config_file, "--resume_from_checkpoint", "latest"),
    )
    assert resumed.wait() == 0, resumed.log(0)[-3000:] + resumed.log(1)[-3000:]
    assert "resumed from" in resumed.log(0)
    expected = load_file(straight.folder / "out" / "model.safetensors")
    assert_equal_weights(load_file(output / "model.safetensors"), expected, "resumed vs uninterrupted")
    assert_equal_weights(resumed.weights(1), expected, "resumed rank 1 vs uninterrupted")
    summary = json.loads((output / "train_results.json").read_text())
    assert summary["step"] == 24 and summary["samples_seen"] == 24 * 16


def test_a_frozen_node_ends_the_run_at_the_process_group_timeout(stubs, colour_dataset, config_file, tmp_path):
    output = tmp_path / "out"
    args = pretraining_args(colour_dataset, output, config_file, "--ddp_timeout", "10", "--max_train_steps", "2000")
    job = Job(stubs, tmp_path / "job", args)
    deadline = time.time() + 180
    while not (output / "checkpoint-3" / "trainer_state.json").exists():
        assert job.process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    frozen = job.node_processes(1)
    for process in frozen:  # alive, sockets open, but silent: only the timeout can tell
        process.suspend()
    stopped = time.time()
    psutil.Process(int((job.folder / "node0.pid").read_text())).wait(timeout=120)
    took = time.time() - stopped
    for process in frozen:
        process.kill()
    job.wait()
    lines = [line for line in job.log(0).splitlines() if line.startswith("error: process 0 lost contact")]
    assert len(lines) == 1, job.log(0)[-5000:]
    assert "froze for over 10s" in lines[0]
    assert 9 < took < 60, f"the other node stopped {took:.1f}s after the freeze"
    print(f"the other node stopped {took:.1f}s after the freeze (--ddp_timeout 10)")


def test_processes_per_node_come_from_slurms_gpu_count(stubs, tmp_path):
    """SLURM writes --gpus-per-node a100:8 as SLURM_GPUS_PER_NODE=a100:8 (node 2 of 2 stops the job at once)."""
    job = Job(stubs, tmp_path, [], SLURM_GPUS_PER_NODE="a100:8", SRUN_NODE_IDS="2", MAIN_PORT="29555")
    assert job.wait(timeout=60) != 0
    assert job.process.stdout.read().startswith("2 nodes x 8 processes, main node 127.0.0.1:29555, config ")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SRUN_NODE_IDS": "1", "CONNECT_TIMEOUT": "2"},
            "error: node 1 ({host}) cannot reach the main node 127.0.0.1:{port} within 2s (CONNECT_TIMEOUT)",
        ),
        ({"SRUN_NODE_IDS": "2"}, "error: machine rank 2 is not below the number of machines 2"),
        (
            {"SLURM_JOB_NODELIST": ""},
            "error: not inside a SLURM job (no SLURM_JOB_NODELIST / SLURM_NNODES): submit this script with sbatch",
        ),
        (
            {"SLURM_GPUS_PER_NODE": ""},
            "error: no GPUs per node: submit with --gpus-per-node N or set PROCESSES_PER_NODE",
        ),
    ],
)
def test_a_node_that_cannot_join_says_so_in_one_line(stubs, tmp_path, env, message):
    port = str(free_port())  # nothing listens there: the main node is unreachable
    job = Job(stubs, tmp_path, ["--output_dir", str(tmp_path / "out")], MAIN_PORT=port, **env)
    started = time.time()
    assert job.wait(timeout=60) != 0
    assert time.time() - started < 30
    output = job.process.stdout.read() + "".join(path.read_text() for path in tmp_path.glob("node*.log"))
    expected = message.format(host=os.uname().nodename, port=port)
    assert [line for line in output.splitlines() if line.startswith("error:")] == [expected], output
    assert "Traceback" not in output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            RuntimeError(
                "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:37019: "
                "Connection reset by peer. This is typically caused by a remote worker hanging"
            ),
            "Read error [127.0.0.1]:37019: Connection reset by peer",
        ),
        (RuntimeError("Application timeout caused pair closure"), "Application timeout caused pair closure"),
        (torch.distributed.DistNetworkError("Broken pipe\nmore"), "Broken pipe"),
        (RuntimeError("Expected to have finished reduction in the prior iteration"), None),  # a bug, not a peer
        (ValueError("timed out"), None),
    ],
)
def test_lost_peer_errors_become_one_line_and_others_keep_their_traceback(error, reason):
    from sgmae_training.engine import is_lost_peer, lost_peer_message

    assert is_lost_peer(error) == (reason is not None)
    if reason:
        message = lost_peer_message(error, 1, "/shared/out", 30)
        assert "\n" not in message and message.startswith(
            f"error: process 1 lost contact with the other processes of the run ({reason}): "
        )
        assert message.endswith(
            "froze for over 30s, or the network failed. Start the same command on every node again with "
            "--resume_from_checkpoint latest to continue from the newest checkpoint in /shared/out"
        )
