"""The limits of a lent accelerator call, and the sizes a call is checked against before it is made.

A lent machine receives the tracked tree plus the ignored folders named to carry (64 MiB in all), returns at most 8
files from its output folder (none deeper than two folders, each at most 16 MiB), and takes a command of at most
2,000 characters; the tracked tree itself stays under 10 MiB so the 112 px data fits beside it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
TREE_LIMIT = 10 * MiB
CARRY_LIMIT = 64 * MiB
FILES_BACK = 8
FOLDERS_DEEP = 2
FILE_LIMIT = 16 * MiB
COMMAND_CHARACTERS = 2000


def tracked_bytes(repo: Path = REPO) -> int:
    """The size of the files git tracks in `repo` (as they are on disk; a tracked file deleted there counts 0)."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    paths = (repo / name for name in listing.decode().split("\0") if name)
    return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())


def folder_bytes(folder: Path) -> int:
    """The size of every plain file under `folder` (0 where it does not exist)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def files_coming_back(output: Path) -> list[str]:
    """The problems with what `output` would send back: too many files, too deep, too large (empty when it fits)."""
    files = [path for path in output.rglob("*") if path.is_file()]
    problems = [f"{len(files)} files (at most {FILES_BACK})"] if len(files) > FILES_BACK else []
    for path in files:
        relative = path.relative_to(output)
        if len(relative.parts) - 1 > FOLDERS_DEEP:
            problems.append(f"{relative} is deeper than {FOLDERS_DEEP} folders")
        if path.stat().st_size > FILE_LIMIT:
            problems.append(f"{relative} is over {FILE_LIMIT // MiB} MiB")
    return problems


# ----- what the lent machine's Python has ---------------------------------------------------------------------------
LENT_PACKAGES = ("torch", "transformers", "accelerate", "torchvision", "timm", "pyarrow", "pandas", "scikit-learn")
PINNED = {"transformers": "5.17.0", "accelerate": "1.15.0"}  # the lent machine's: the code may use nothing newer
API_LIST = Path(__file__).with_name("lent_apis.txt")
CODE_FOLDERS = ("modeling_sgmae", "sgmae_training", "benchmarks")


def code_files(repo: Path = REPO) -> list[Path]:
    """The Python files that run on a lent machine: the scripts at the root and the packages they use."""
    return sorted([*repo.glob("*.py"), *(path for folder in CODE_FOLDERS for path in (repo / folder).rglob("*.py"))])


def pinned_names(paths: list[Path]) -> set[str]:
    """Every `module.name` the files take from transformers or accelerate: `from transformers.x import Name` gives
    `transformers.x.Name`; `import transformers` then `transformers.a.b` gives `transformers.a` (its first level)."""
    names = set()
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in PINNED:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.asname or a.name for a in node.names if a.name.split(".")[0] in PINNED)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
                names.add(f"{node.value.id}.{node.attr}")
    return names


def listed_names() -> set[str]:
    """The names checked against the pinned releases (one a line; `#` starts a comment)."""
    lines = (line.partition("#")[0].strip() for line in API_LIST.read_text().splitlines())
    return {line for line in lines if line}


RESOLVE = """
import importlib, sys
missing = []
for name in sys.argv[1:]:
    module, _, attribute = name.rpartition(".")
    try:
        getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
print("\\n".join(missing))
"""


def missing_from_pinned(site: Path, names: set[str]) -> list[str]:
    """The names that transformers and accelerate as installed in `site` (the pinned releases) do not have."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    versions = "import transformers, accelerate; print(transformers.__version__, accelerate.__version__)"
    found = subprocess.run([sys.executable, "-c", versions], env=env, capture_output=True, text=True, check=True)
    if found.stdout.split() != [PINNED["transformers"], PINNED["accelerate"]]:
        raise SystemExit(f"error: {site} holds transformers/accelerate {found.stdout.strip()}, not {PINNED}")
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE, *sorted(names)], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.split()
