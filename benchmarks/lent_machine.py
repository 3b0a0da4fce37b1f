"""The limits of a lent accelerator call, and the sizes a call is checked against before it is made.

A lent machine receives the tracked tree plus the ignored folders named to carry (64 MiB in all), returns at most 8
files from its output folder (none deeper than two folders, each at most 16 MiB), and takes a command of at most
2,000 characters; the tracked tree itself stays under 10 MiB so the 112 px data fits beside it.
"""

from __future__ import annotations

import subprocess
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
