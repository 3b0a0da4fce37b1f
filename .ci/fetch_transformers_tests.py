#!/usr/bin/env python
"""CI install step (called by .ci/run): put the installed transformers' common test files where the tests read them.

The wheel does not ship transformers' `tests/`; the sdist on PyPI does. It is downloaded here, once, so the tests
themselves use no network (tests/transformers_common.py only reads the cache). Run it in the environment the tests
use, after `pip install -e ".[test]"` (or `.[dev]`); it does nothing when the files are already there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from transformers_common import COMMON_FILES, missing_files, package_dir


def fetch(package: Path) -> None:
    """Download the installed version's sdist from PyPI (no build) and extract its top-level common test files."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={transformers.__version__}", "-d", download]
        subprocess.run(command, check=True, timeout=600)
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as sdist:
            for member in sdist.getmembers():
                name = Path(member.name)
                if len(name.parts) == 3 and name.parts[1] == "tests" and name.name in COMMON_FILES:
                    (package / name.name).write_bytes(sdist.extractfile(member).read())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)  # no options: --help explains, anything else is refused before any download
    package = package_dir()
    if missing_files():
        fetch(package)
    if missing := missing_files():
        raise SystemExit(f"error: transformers {transformers.__version__}'s sdist lacks tests/{', '.join(missing)}")
    print(f"transformers {transformers.__version__}'s common tests: {package}")


if __name__ == "__main__":
    main()
