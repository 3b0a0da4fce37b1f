"""Script arguments: from the command line or one JSON/YAML file, checked before anything runs."""

from __future__ import annotations

import ast
import difflib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from modeling_sgmae.hub_access import hub_advice
from modeling_sgmae.hub_access import hub_unreachable as probe_hub

# How long a process waits in a collective for the others (transformers' ddp_timeout): a frozen or unreachable peer
# ends the run after this instead of never. Long enough for the main process's checkpoint and final-model writes.
DISTRIBUTED_TIMEOUT_S = 1800


def parse_script_args(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """Dataclasses from the command line, or from a single .json / .yaml file argument.

    An argument the scripts do not have (a misspelling, another library's name) is one `error:` line naming it and
    the closest real ones, instead of HfArgumentParser's traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        text = Path(argv[0]).read_text()
        values = (json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)) or {}
        refuse_unknown_arguments(parser, [f"--{name}" for name in values], source=argv[0])
        return parser.parse_dict(values)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    refuse_unknown_arguments(parser, remaining)
    return tuple(parsed)


def refuse_unknown_arguments(parser: HfArgumentParser, arguments: list[str], source: str | None = None) -> None:
    """Stop with one line naming the arguments `parser` does not know and, for each, the closest ones it does."""
    if not arguments:
        return
    # HfArgumentParser also accepts --a-b for --a_b; suggest the spelling the docs use
    known = sorted({option.replace("-", "_") for action in parser._actions for option in action.option_strings})
    known = [f"--{option.lstrip('_')}" for option in known if option.startswith("__")]
    unknown = [argument.split("=")[0] for argument in arguments if argument.startswith("-")]
    unknown = [name for name in unknown if "--" + name.lstrip("-").replace("-", "_") not in known]
    if not unknown:
        if source is None:  # values that were left over (e.g. a second positional argument)
            raise SystemExit(f"error: unexpected argument(s): {' '.join(arguments)}; see --help")
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.66)
        close += [option for option in known if name.lstrip("-") in option and option not in close]
        hints.append(f"{name} (closest: {', '.join(close[:3])})" if close else name)
    where = f" in {source}" if source else ""
    raise SystemExit(f"error: unknown argument(s){where}: {'; '.join(hints)}; see --help for the full list")


def hub_unreachable(name: str | None) -> str | None:
    """For a Hub id `name`, why the Hub cannot be asked for it (`modeling_sgmae.hub_access.hub_unreachable`); when
    the one quick request fails, the process goes offline (as HF_HUB_OFFLINE=1 would set it), so that transformers
    and `datasets` read their local caches at once instead of retrying for half a minute."""
    import datasets
    import huggingface_hub.constants as hub_constants

    reason = probe_hub(name)
    if reason and not hub_constants.HF_HUB_OFFLINE:
        hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # the same for DataLoader workers and subprocesses
    return reason


@contextmanager
def dataset_reachable(dataset_name: str | None) -> Iterator[None]:
    """One `error:` line, instead of `datasets`' ConnectionError traceback, when a Hub dataset id cannot be reached
    (offline, or no network): what happened and how to point the scripts at a local copy. Found out with one quick
    request (see `hub_unreachable`), not after `datasets`' retries."""
    reason = hub_unreachable(dataset_name)
    try:
        yield
    except ConnectionError as error:
        reason = reason or " ".join(str(error).split())
        raise SystemExit(
            f"error: dataset {dataset_name!r} is not a local folder and could not be fetched from the Hub ({reason}); "
            f"{hub_advice(dataset_name, reason, 'dataset')}"
        ) from error


def check_positive(arguments: object, names: tuple[str, ...], minimum: int = 1) -> None:
    """A clear error, before anything runs, for an argument that must be an integer >= `minimum` (or None)."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    for name in names:
        value = getattr(arguments, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise SystemExit(f"error: --{name} must be {kind}, got {value!r}")


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16", "fp8")
# The loop's integer arguments that every training script declares and checks with `check_positive`.
LOOP_POSITIVE_ARGUMENTS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps", "logging_steps",
)  # fmt: skip


def check_checkpointing_steps(value: str | None) -> None:
    """--checkpointing_steps is N (a positive integer), 'epoch' or 'none'."""
    if value in (None, "none", "epoch"):
        return
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"error: --checkpointing_steps must be a positive integer, 'epoch' or 'none', got {value!r}")


@dataclass
class RunArguments:
    """What every training script shares: precision, clipping, checkpoints, trackers, the process group, the Hub."""

    mixed_precision: str = field(
        default="auto", metadata={"help": "no, bf16, fp16 or auto (bf16 on a GPU unless the launcher chose a mode)."}
    )
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    checkpointing_steps: str | None = field(default="epoch", metadata={"help": "N (steps), 'epoch' or 'none'."})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Keep only the newest N checkpoints (0: keep all)."}
    )
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint folder or 'latest'."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: tensorboard, none or all."})
    ddp_timeout: int = field(
        default=DISTRIBUTED_TIMEOUT_S,
        metadata={"help": "Seconds a process waits for the others (a frozen or lost node ends the run after this)."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the output folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Token for --push_to_hub."})

    def check(self) -> None:
        """A clear error, before anything runs, for a bad value of these shared arguments."""
        check_positive(self, ("ddp_timeout",))
        check_positive(self, ("save_total_limit",), minimum=0)
        check_checkpointing_steps(self.checkpointing_steps)
        if self.push_to_hub and not self.hub_model_id:
            raise SystemExit("error: --push_to_hub needs --hub_model_id (the Hub repository to upload to)")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise SystemExit(
                f"error: --mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}"
            )


def parse_config_overrides(text: str | None) -> dict:
    """`--config_overrides "hint_ratio=0.1,image_size=[64,64],norm_pix_loss=True,mask_feature_layer=None"` as a dict.

    Items are split at commas outside brackets and quotes; a value is read as JSON, else as a Python literal (True,
    None, 'text'), else kept as a plain string. An item without `name=` or without a value is a clear error.
    """
    if not text or not text.strip():
        return {}
    overrides = {}
    for item in _split_at_top_level_commas(text):
        name, equals, value = (part.strip() for part in item.partition("="))
        if not name or not equals:
            raise SystemExit(f"error: --config_overrides item {item.strip()!r} is not name=value")
        if not value:
            raise SystemExit(f"error: --config_overrides gives no value for {name!r}")
        overrides[name] = _literal(value)
    return overrides


def _split_at_top_level_commas(text: str) -> list[str]:
    items, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    return [*items, text[start:]]


def _literal(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
