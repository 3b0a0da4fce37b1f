"""transformers' own common model tests, taken from the installed version's source distribution.

The wheel does not ship `tests/`. CI's install step (`.ci/fetch_transformers_tests.py`) extracts the common test
modules (COMMON_FILES) from the sdist on PyPI into a cache that the tests only read; without the cache they fail in CI
and are skipped elsewhere. The sdist lacks three helper modules they import from the repository's `tests/` tree; those
are stood in for here: `GenerationTesterMixin` (generation tests do not apply to a vision encoder), `ExportTesterMixin`
(torch.export is checked by the project's own test in test_transformers_conventions.py) and `config_common_kwargs`
(the common configuration fields of `PreTrainedConfig`, set to non-default values).

`PipelineTesterMixin` cannot run from the sdist either: it reads the repository's `tests/utils/tiny_model_summary.json`
and `tests/pipelines/`, and tiny checkpoints from the Hub. Its checks (both pipelines on a saved folder, in a fresh
process) are the project's own: `conftest.check_folder_in_fresh_process` and test_hub_integration.py.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import transformers

PACKAGE = "transformers_common_tests"
FETCH_COMMAND = "python .ci/fetch_transformers_tests.py"  # CI's install step; run from the checkout's root
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


def package_dir() -> Path:
    """The package of extracted test modules inside the cache."""
    return cache_root() / PACKAGE


def missing_files() -> list[str]:
    """The common test files not (yet) in the cache."""
    return [name for name in COMMON_FILES if not (package_dir() / name).is_file()]


def load() -> ModuleType:
    """The package holding transformers' common test modules, from the cache (no network here): a failure in CI
    (CI=true) when the files are missing, a skip elsewhere."""
    root, package = cache_root(), package_dir()
    if missing := missing_files():
        message = (
            f"transformers {transformers.__version__}'s common tests ({', '.join(missing)}) are not in {package}: "
            f"run `{FETCH_COMMAND}` once (it downloads transformers' sdist from PyPI)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text.lstrip())
    (package / "__init__.py").touch()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(PACKAGE)
