"""Everything a lent accelerator call needs beside the tracked tree, built on this machine before the call.

    bash benchmarks/gpu_run.sh --prepare            # .data/imagenette (112 px) and .whl/ (ignored), then the command

The lent machine's Python has torch, transformers, accelerate, torchvision, timm, pyarrow, pandas and scikit-learn
but neither `datasets` nor `evaluate`: `.whl/` holds the wheels of exactly the distributions those two need beyond
what the lent packages bring (read from this environment's metadata, at this environment's versions, for CPython
3.10-3.14 since the lent machine's version is unknown). The names the code imports from transformers and accelerate
are checked against the lent machine's releases (downloaded into `.pins/`, which does not travel). `--offline`
repacks this environment's installed distributions as wheels instead (this Python only; what the tests use).
Prints the sizes against the 64 MiB limit, the folders to carry and the exact command.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks.lent_machine import (
    CARRY_LIMIT,
    COMMAND_CHARACTERS,
    LENT_PACKAGES,
    PINNED,
    REPO,
    MiB,
    code_files,
    folder_bytes,
    listed_names,
    missing_from_pinned,
    pinned_names,
    tracked_bytes,
)

NEEDED = ("datasets", "evaluate")
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")  # torch 2.11 needs 3.10 or newer
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_5_x86_64")
DATA = Path("../shared/data/imagenette")
CARRY = (".data", ".whl")
MANIFEST = "manifest.txt"  # the distributions in .whl/, `name==version` a line: what the lent machine installs
COMMAND = 'bash benchmarks/gpu_run.sh --output "$OUT"'


def requirement_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need, themselves included (their unconditional requirements, followed
    through this environment's metadata; a requirement not installed here is left out)."""
    seen: set[str] = set()
    todo = [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def lacking() -> dict[str, str]:
    """What the lent machine lacks: the distributions of `datasets` and `evaluate` beyond the lent packages', with
    this environment's versions."""
    missing = requirement_closure(NEEDED) - requirement_closure(LENT_PACKAGES)
    return {name: metadata.version(name) for name in sorted(missing)}


def download(pins: dict[str, str], folder: Path) -> None:
    """Binary wheels of `pins` for every CPython in PYTHONS (a pure-Python wheel is the same file for all)."""
    for python in PYTHONS:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(folder),
        ]
        command += ["--python-version", python, "--implementation", "cp"]
        command += [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        subprocess.run(command + [f"{name}=={version}" for name, version in pins.items()], check=True)


def repack(name: str, folder: Path) -> None:
    """A wheel of the installed distribution `name`, from the files its RECORD lists (this Python's build)."""
    distribution = metadata.distribution(name)
    tags = [line.split(": ", 1)[1] for line in distribution.read_text("WHEEL").splitlines() if line.startswith("Tag")]
    stem = f"{canonicalize_name(name).replace('-', '_')}-{distribution.version}"
    root = Path(distribution.locate_file(""))
    files = [path for path in distribution.files if not str(path).endswith(".pyc") and ".." not in path.parts]
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(folder / f"{stem}-{tags[0]}.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        for path in files:
            if path.name == "RECORD" or not (root / path).is_file():
                continue
            data = (root / path).read_bytes()
            wheel.writestr(str(path), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([str(path), f"sha256={digest}", len(data)])
        record_path = next(str(path) for path in files if path.name == "RECORD")
        writer.writerow([record_path, "", ""])
        wheel.writestr(record_path, record.getvalue())


def build_wheels(folder: Path, offline: bool) -> dict[str, str]:
    """`.whl/`: the wheels of what the lent machine lacks and their manifest."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = lacking()
    if offline:
        for name in pins:
            repack(name, folder)
    else:
        download(pins, folder)
    (folder / MANIFEST).write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    return pins


def copy_data(source: Path, target: Path) -> None:
    """The 112 px configuration of Imagenette and its README (which declares the configurations)."""
    if not (source / "112px").is_dir():
        raise SystemExit(f"error: no 112px folder in {source} (Imagenette in the Hub layout)")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source / "112px", target / "112px")
    shutil.copyfile(source / "README.md", target / "README.md")


def check_pinned_apis(folder: Path) -> None:
    """The names the code takes from transformers and accelerate: all listed, and all in the lent releases."""
    unlisted = sorted(pinned_names(code_files()) - listed_names())
    if unlisted:
        raise SystemExit(
            f"error: not checked against the lent releases: {', '.join(unlisted)} (benchmarks/lent_apis.txt)"
        )
    shutil.rmtree(folder, ignore_errors=True)
    wheels = folder / "wheels"
    pins = [f"{name}=={version}" for name, version in PINNED.items()] + ["huggingface-hub>=1.5,<2"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *pins], check=True)
    for wheel in wheels.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(folder / "site")
    missing = missing_from_pinned(folder / "site", listed_names())
    if missing:
        raise SystemExit(
            f"error: transformers {PINNED['transformers']} / accelerate {PINNED['accelerate']} lack: "
            + ", ".join(missing)
        )
    print(f"the {len(listed_names())} names the code takes from transformers and accelerate exist in {PINNED}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offline", action="store_true", help="repack this environment's wheels (no download)")
    parser.add_argument("--into", type=Path, default=REPO, help="where .data/ and .whl/ go (default: the checkout)")
    parser.add_argument("--data", type=Path, default=REPO / DATA, help="Imagenette in the Hub layout")
    args = parser.parse_args()
    copy_data(args.data, args.into / ".data" / "imagenette")
    pins = build_wheels(args.into / ".whl", args.offline)
    if not args.offline:
        check_pinned_apis(args.into / ".pins")
    tree = tracked_bytes()
    carried = {folder: folder_bytes(args.into / folder) for folder in CARRY}
    total = tree + sum(carried.values())
    print(f"wheels for the lent machine: {', '.join(f'{name} {version}' for name, version in pins.items())}")
    sizes = " + ".join(f"{name} {size / MiB:.1f} MiB" for name, size in carried.items())
    print(f"tree {tree / MiB:.1f} MiB + {sizes} = {total / MiB:.1f} MiB (limit {CARRY_LIMIT // MiB} MiB)")
    print(f"carry: {list(CARRY)}")
    print(f"command ({len(COMMAND)} characters, limit {COMMAND_CHARACTERS}): {COMMAND}")
    if total > CARRY_LIMIT:
        raise SystemExit(f"error: {total / MiB:.1f} MiB would travel, over {CARRY_LIMIT // MiB} MiB")


if __name__ == "__main__":
    main()
