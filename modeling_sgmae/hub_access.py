"""Loading from the Hub without network: one quick request tells whether the Hub answers, instead of
huggingface_hub's retries (about half a minute, a warning each time) before it reads its local cache or fails."""

import re
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub.constants as hub_constants

# How long the one request that tells whether the Hub answers may take.
HUB_PROBE_TIMEOUT_S = 3.0
HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # `name` or `owner/name`, as the Hub spells repositories


def is_hub_id(name: str) -> bool:
    """Whether `name` can only mean a Hub repository: no local path of that name, and spelt as a Hub id (a path that
    starts with `/`, `.` or `~`, or has more than one `/`, is a local folder that does not exist)."""
    return not Path(name).expanduser().exists() and HUB_ID.fullmatch(name) is not None


def hub_unreachable(name: str | None) -> str | None:
    """For a Hub id `name` (see `is_hub_id`), why the Hub cannot be asked for it: offline mode is set, or one request
    to the Hub (HUB_PROBE_TIMEOUT_S, no retries) failed; None for a local path or when the Hub answers."""
    if not name or not is_hub_id(name):
        return None
    if hub_constants.HF_HUB_OFFLINE:
        return "offline mode is set (HF_HUB_OFFLINE=1)"
    request = urllib.request.Request(hub_constants.ENDPOINT, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:  # it answered, with an error status: reachable
        return None
    except OSError as error:  # no network, no name resolution, refused, timed out
        cause = getattr(error, "reason", error)
        return f"{hub_constants.ENDPOINT} cannot be reached: {' '.join(str(cause).split())}"
    return None


def hub_advice(name: str, reason: str, repo_type: str = "model") -> str:
    """What to do about a Hub id that could not be fetched: a local copy, or offline mode for cached copies."""
    dataset = repo_type == "dataset"
    download = f"`hf download {name}{' --repo-type dataset' if dataset else ''} --local-dir DIR`"
    advice = f"download it where there is network ({download}) and pass DIR{' (its parquet or .tar files)' * dataset}"
    if "HF_HUB_OFFLINE" not in reason:
        advice += ", or set HF_HUB_OFFLINE=1 to use only copies already in the local cache"
    return advice
