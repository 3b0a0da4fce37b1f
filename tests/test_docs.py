"""The documentation as a reader uses it: every relative link and #anchor in README.md, CONTRIBUTING.md and docs/*.md
resolves (GitHub's anchor rules), and every `python <script>` / `python -m <module>` / `accelerate launch ... <script>`
command in their bash blocks names a script that exists and only flags that its `--help` (or Accelerate's) lists.
A command is written out in full or is a visible template with named placeholders, never a literal `...`.
"""

from __future__ import annotations

import functools
import os
import re
import runpy
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")  # [text](target), ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {"&&", "||", ";", "|"}


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks, dots, slashes, ...) dropped, spaces to
    hyphens; letters, digits, `_` and `-` stay."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    return "".join(char for char in text.lower() if char.isalnum() or char in " _-").replace(" ", "-")


@functools.cache
def anchors(page: Path) -> set[str]:
    """Every #anchor of a markdown page, numbered -1, -2 ... for repeated headings as GitHub does."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        anchor = github_anchor(heading)
        result.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return result


def test_github_anchor_rules():
    assert github_anchor("With `transformers.Trainer`") == "with-transformerstrainer"
    assert github_anchor("Evaluation: fine-tuning, linear probing, kNN") == "evaluation-fine-tuning-linear-probing-knn"
    assert (
        github_anchor("Imagenette at 196 patches (CPU, 112 px / patch 8, 30 epochs, two seeds)")
        == "imagenette-at-196-patches-cpu-112-px--patch-8-30-epochs-two-seeds"
    )
    assert github_anchor("A lent GPU in one command (`benchmarks/gpu_run.sh`)") == (
        "a-lent-gpu-in-one-command-benchmarksgpu_runsh"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, broken


def commands(page: Path) -> list[list[str]]:
    """The commands of a page's bash blocks as tokens: continuation lines joined, comments dropped, split at && ; |."""
    result = []
    for block in BASH_BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            command: list[str] = []
            for token in [*shlex.split(line, comments=True), ";"]:
                if token in SEPARATORS:
                    result += [command] if command else []
                    command = []
                else:
                    command.append(token)
    return result


def program_and_flags(tokens: list[str]) -> tuple[str, list[str], list[str]] | None:
    """(script or `-m module`, its flags, the launcher's flags) of a python / accelerate launch / sbatch command."""
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # OMP_NUM_THREADS=1 python ...
        tokens = tokens[1:]
    if tokens[:1] == ["python"] and tokens[1:2] == ["-m"]:
        return f"-m {tokens[2]}", tokens[3:], []
    if tokens[:1] == ["python"]:
        return tokens[1], tokens[2:], []
    if tokens[:2] == ["accelerate", "launch"] or tokens[:1] == ["sbatch"]:
        start = 2 if tokens[0] == "accelerate" else 1
        position = next(index for index, token in enumerate(tokens) if token.endswith((".py", ".sbatch")))
        script = "run_pretraining.py" if tokens[position].endswith(".sbatch") else tokens[position]
        launcher = tokens[start:position] if tokens[0] == "accelerate" else []
        return script, tokens[position + 1 :], launcher
    return None


def flags(tokens: list[str]) -> list[str]:
    return [token.split("=")[0] for token in tokens if token.startswith("--")]


@functools.cache
def help_flags(program: str) -> frozenset[str]:
    """The flags a program's --help lists in its option column (not flags its descriptions mention)."""
    if program == "accelerate launch":
        command = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    else:
        command = [sys.executable, *program.split()]
    result = subprocess.run(
        [*command, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=help_env()
    )
    assert result.returncode == 0, f"{program} --help failed: {result.stderr[-2000:]}"
    options = [re.split(r"\s{2,}", line.strip())[0] for line in result.stdout.splitlines() if line.strip()[:1] == "-"]
    return frozenset(flag for option in options for flag in re.findall(r"--[\w-]+", option))


# Every request of a `--help` run goes to a closed local port: a command that reaches for the network fails here.
NO_NETWORK = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "PIP_NO_INDEX": "1",
    "HF_ENDPOINT": "http://127.0.0.1:9",
}


def help_env() -> dict[str, str]:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT),
        **NO_NETWORK,
    )


def test_the_ci_fetch_step_prints_its_help_and_downloads_nothing(tmp_path):
    """The README's test command starts with `.ci/fetch_transformers_tests.py`; its `--help` explains it and
    fetches nothing, even where transformers' tests are not cached yet."""
    env = help_env() | {"SGMAE_TRANSFORMERS_TESTS": str(tmp_path / "cache")}
    script = str(REPO_ROOT / ".ci" / "fetch_transformers_tests.py")
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: fetch_transformers_tests.py") and "common test files" in " ".join(
        result.stdout.split()
    )
    assert not (tmp_path / "cache").exists()


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(str(page.relative_to(REPO_ROOT)), tokens) for page in PAGES for tokens in commands(page)]


def test_the_docs_show_the_commands_a_newcomer_needs():
    readme = [" ".join(tokens) for page, tokens in documented_commands() if page == "README.md"]
    assert any("run_pretraining.py --output_dir outputs/sgmae-demo" in command for command in readme)
    assert "python .ci/fetch_transformers_tests.py" in readme
    pytest_command = "python -m pytest -q -n 2 tests"
    assert any(command.startswith(f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {pytest_command}") for command in readme)
    assert pytest_command in (REPO_ROOT / ".ci" / "run").read_text().splitlines(), "CI runs the README's test command"
    quick = [command for command in readme if "run_classification.py" in command]
    assert quick and all("--max_train_samples" in command and "--max_eval_samples" in command for command in quick)


def test_every_documented_command_names_real_scripts_and_flags():
    checked, wrong, found = 0, [], []
    for page, tokens in documented_commands():
        if "..." in tokens:
            wrong.append(f"{page}: a literal '...' in {' '.join(tokens)}")
        command = program_and_flags(tokens)
        if command is None or command[0] in ("-m pytest", "-m pip"):
            continue
        if not command[0].startswith("-m") and not (REPO_ROOT / command[0]).is_file():
            wrong.append(f"{page}: no script {command[0]}")
            continue
        found.append((page, *command))
    # each program's --help once, a few at a time: most of their time is importing torch and transformers
    programs = {program for _, program, _, _ in found} | {"accelerate launch"}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(help_flags, sorted(programs)))
    for page, program, arguments, launcher in found:
        unknown = [flag for flag in flags(arguments) if flag not in help_flags(program)]
        unknown += [flag for flag in flags(launcher) if flag not in help_flags("accelerate launch")]
        if unknown:
            wrong.append(f"{page}: {program} has no {', '.join(unknown)}")
        checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 30  # the docs' commands were found, not skipped


def setup_arguments() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (setup.py run with setup() captured)."""
    captured = {}
    with mock.patch("setuptools.setup", lambda **arguments: captured.update(arguments)):
        runpy.run_path(str(REPO_ROOT / "setup.py"), run_name="__main__")
    return captured


def test_the_first_command_installs_the_demo_and_no_test_tools():
    """The README's first command installs what the demo and its page import, and not the test or lint tools; the
    test command's extra has the tests' tools; `.[dev]` (CI) has everything."""
    readme = [" ".join(tokens) for page, tokens in documented_commands() if page == "README.md"]
    installs = [re.search(r"pip install -e \.\[(\w+)\]", command) for command in readme[:4]]
    first, tests = (match.group(1) for match in installs if match)
    extras = {
        name: {re.split(r"[<>=\[ ]", requirement)[0] for requirement in requirements}
        for name, requirements in setup_arguments()["extras_require"].items()
    }
    assert {"scikit-image", "gradio"} <= extras[first]
    assert not extras[first] & {"pytest", "timm", "selenium", "ruff", "tensorboard"}
    assert {"pytest", "parameterized", "timm", "selenium", "scikit-image", "gradio"} <= extras[tests]
    assert set().union(*extras.values()) == extras["dev"]


def layout_table() -> set[str]:
    """The backticked paths in the first column of CONTRIBUTING's Layout table."""
    section = (REPO_ROOT / "CONTRIBUTING.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| ") and "`" in line]
    return {path for cell in rows for path in re.findall(r"`([^`]+)`", cell)}


def test_the_layout_table_names_every_module_and_only_real_paths():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    modules = {
        path
        for path in tracked.split()
        if re.fullmatch(r"(modeling_sgmae|sgmae_training|benchmarks)/.*\.(py|sh)|run_\w+\.py|app\.py", path)
        and not path.endswith("__init__.py")
        and not path.startswith("sgmae_training/metrics/")  # evaluate's metric scripts: one row for their folder
    }
    table = layout_table()
    assert not modules - table, f"CONTRIBUTING's Layout table lacks {sorted(modules - table)}"
    assert all((REPO_ROOT / path).exists() for path in table), sorted(p for p in table if not (REPO_ROOT / p).exists())
