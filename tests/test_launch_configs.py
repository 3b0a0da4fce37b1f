"""The launch configs in configuration/accelerate/: they load, the multi-node ones mark the fields to fill in, the
README's launches start without Accelerate's "values were not passed ... defaults used" warning, and a launch that
fails (as the README and docs write it, with `-q`) ends in the script's one `error:` line.

Accelerate reads `--config_file`, else `$HF_HOME/accelerate/default_config.yaml`; each launch here gets an HF_HOME of
its own, so nothing reads or writes the user's real ~/.cache/huggingface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO_ROOT
from test_run_pretraining import config_file, pretraining_args

CONFIGS = REPO_ROOT / "configuration" / "accelerate"
DEFAULT = CONFIGS / "default.yaml"
WARNING = "were not passed to `accelerate launch` and had defaults used instead"
__all__ = ["config_file"]  # a fixture shared with test_run_pretraining


def launch(hf_home: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` as a user types it: no OMP_NUM_THREADS (whose absence Accelerate also warns about on
    CPUs), no ACCELERATE_* variables, Accelerate's default config looked up under `hf_home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_NUM_THREADS"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env |= extra_env
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def short_run(image_dataset_dir: Path, output: Path, config_file: str) -> list[str]:
    extra = ("--max_train_steps", "2", "--checkpointing_steps", "none", "--max_train_samples", "16")
    return [str(REPO_ROOT / "run_pretraining.py"), *pretraining_args(image_dataset_dir, output, config_file, *extra)]


def test_every_config_loads_and_the_multi_node_ones_name_the_per_node_fields():
    for path in CONFIGS.glob("*.yaml"):
        load_config_from_file(str(path))  # Accelerate's own reader: unknown keys or bad values raise
    for name in ("multi_node_ddp_bf16.yaml", "multi_node_fsdp.yaml"):
        text = (CONFIGS / name).read_text()
        config = load_config_from_file(str(CONFIGS / name))
        assert config.num_machines > 1 and config.same_network and config.rdzv_backend == "static"
        for field in ("num_machines", "num_processes", "main_process_ip", "main_process_port"):
            assert re.search(rf"^{field}: .*# per job", text, re.MULTILINE), field
        assert re.search(r"^machine_rank: 0 .*# per node", text, re.MULTILINE)


def test_the_readme_launches_start_without_the_defaults_warning(image_dataset_dir, config_file, tmp_path):
    # Without any config Accelerate warns: the check below can see the warning.
    bare = launch(tmp_path / "no-config", str(REPO_ROOT / "run_pretraining.py"), "--help")
    assert WARNING in bare.stderr

    # The README's commands pass the shipped default config.
    run = short_run(image_dataset_dir, tmp_path / "a", config_file)
    result = launch(tmp_path / "no-config", "--config_file", str(DEFAULT), *run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert WARNING not in result.stderr
    assert (tmp_path / "a" / "model.safetensors").is_file()

    # Installed as Accelerate's default config, it makes a bare `accelerate launch run_pretraining.py` quiet too.
    hf_home = tmp_path / "with-default"
    (hf_home / "accelerate").mkdir(parents=True)
    shutil.copy(DEFAULT, hf_home / "accelerate" / "default_config.yaml")
    result = launch(hf_home, *short_run(image_dataset_dir, tmp_path / "b", config_file))
    assert result.returncode == 0, result.stderr[-3000:]
    assert WARNING not in result.stderr
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_the_cpu_multi_process_config_starts_two_joined_processes_quietly(image_dataset_dir, config_file, tmp_path):
    """As the README launches it: two processes that train together (global batch 2 x 8), not one alone."""
    config = str(CONFIGS / "cpu_multi_process.yaml")
    run = short_run(image_dataset_dir, tmp_path / "out", config_file)
    result = launch(tmp_path / "home", "--config_file", config, *run, ACCELERATE_USE_CPU="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert WARNING not in result.stderr and "global batch 16" in result.stderr
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["run_pretraining.py", "--max_steps", "2"],
            "error: unknown argument(s): --max_steps (closest: --max_train_steps)",
        ),
        (
            ["run_classification.py", "--num_epochs", "2"],
            "error: unknown argument(s): --num_epochs (closest: --num_train_epochs",
        ),
        (
            ["run_pretraining.py", "--dataset_name", "uoft-cs/cifar10"],
            "error: dataset 'uoft-cs/cifar10' is not a local folder and could not be fetched",
        ),
    ],
)
def test_a_failing_launch_ends_in_the_scripts_one_line(tmp_path, args, line):
    """`accelerate launch -q` (how the README and docs launch) shows the script's error and nothing after it; without
    -q Accelerate adds its RuntimeError and CalledProcessError tracebacks. The exit status is 1 either way."""
    quiet = launch(tmp_path, "-q", "--config_file", str(DEFAULT), *args, "--output_dir", str(tmp_path / "out"))
    assert quiet.returncode == 1
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()] and quiet.stderr.startswith(line), quiet.stderr
    if args[0] == "run_pretraining.py" and "--max_steps" in args:  # what -q hides
        noisy = launch(tmp_path, "--config_file", str(DEFAULT), *args)
        assert noisy.returncode == 1 and noisy.stderr.startswith(line)
        assert "CalledProcessError" in noisy.stderr and len(noisy.stderr.splitlines()) > 10


def test_every_documented_launch_is_quiet_and_names_a_shipped_config():
    """The commands in the code blocks of README.md and docs/*.md (prose may name a bad launch on purpose) pass -q and
    --config_file."""
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL)]
    commands = [line for block in blocks for line in block.splitlines() if "accelerate launch" in line]
    assert len(commands) > 5
    for command in commands:
        named = re.search(r"accelerate launch -q --config_file (\S+)", command)
        assert named, f"launch without -q --config_file: {command}"
        assert (REPO_ROOT / named.group(1)).is_file(), command
