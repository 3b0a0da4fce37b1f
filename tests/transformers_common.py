"""transformers' own common model tests, taken from the installed version's source distribution.

The wheel does not ship `tests/`; the sdist on PyPI carries `test_modeling_common.py`, `test_configuration_common.py`
and `test_pipeline_mixin.py`, but not three helper modules they import from the repository's `tests/` tree. Those are
stood in for here: `GenerationTesterMixin` (generation tests do not apply to a vision encoder), `ExportTesterMixin`
(torch.export is checked by the project's own test in test_transformers_conventions.py) and `config_common_kwargs`
(the common configuration fields of `PreTrainedConfig`, set to non-default values).

`PipelineTesterMixin` cannot run from the sdist either: it reads the repository's `tests/utils/tiny_model_summary.json`
and `tests/pipelines/`, and tiny checkpoints from the Hub. Its checks (both pipelines on a saved folder, in a fresh
process) are the project's own: `conftest.check_folder_in_fresh_process` and test_hub_integration.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

PACKAGE = "transformers_common_tests"
COMMON_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_pipeline_mixin.py",
    "test_backbone_common.py",
)
STAND_INS = {
    "exporters/test_export.py": '''
class ExportTesterMixin:
    """Stand-in: torch.export is checked by SGMAECommonModelTest.test_torch_export."""
''',
    "generation/test_utils.py": '''
class GenerationTesterMixin:
    """Stand-in: generation tests do not apply to a vision encoder."""
''',
    "utils/test_configuration_utils.py": """
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["SGMAEModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
""",
}


def cache_root() -> Path:
    """Where the extracted tests live: $SGMAE_TRANSFORMERS_TESTS, else the checkout's ignored `.cache/`."""
    given = os.environ.get("SGMAE_TRANSFORMERS_TESTS")
    if given:
        return Path(given)
    return Path(__file__).resolve().parents[1] / ".cache" / f"transformers-{transformers.__version__}-tests"


def fetch(root: Path) -> None:
    """Download the installed version's sdist from PyPI (no build) and extract its top-level test files."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={transformers.__version__}", "-d", download]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        package = root / PACKAGE
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as sdist:
            for member in sdist.getmembers():
                name = Path(member.name)
                if len(name.parts) == 3 and name.parts[1] == "tests" and name.name in COMMON_FILES:
                    (package / name.name).write_bytes(sdist.extractfile(member).read())


def load() -> ModuleType:
    """The package holding transformers' common test modules (fetched once, then cached)."""
    root = cache_root()
    package = root / PACKAGE
    if not all((package / name).is_file() for name in COMMON_FILES):
        fetch(root)
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text.lstrip())
    (package / "__init__.py").touch()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(PACKAGE)
