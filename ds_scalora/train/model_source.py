"""Where ``model.model_name_or_path`` points, resolved offline: nothing is ever downloaded.

Three kinds of name, as ``from_pretrained`` users write them:

* a local directory (relative paths from the working directory, then the config file's directory);
* a Hub id (``org/name``) whose snapshot is already in the local Hugging Face cache (``HF_HOME``,
  ``HF_HUB_CACHE``): ``huggingface_hub.snapshot_download(local_files_only=True)`` finds it;
* ``package:<pkg>/<file>.gguf``: a model shipped inside a Python package (``packaged_models``).

A Hub id stays a Hub id in the run's stored config, so an exported adapter names its base portably.
"""

from __future__ import annotations

import os

from .packaged_models import is_packaged, locate


class ModelSourceError(ValueError):
    """The name resolves to no local model; the message says what was tried and what to do."""


def cached_snapshot(name: str) -> str | None:
    """The local snapshot directory of Hub id ``name`` in the Hugging Face cache, or None."""
    if name.count("/") != 1 or name.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a valid id, or not in the cache
        return None


def local_dir(name: str) -> str:
    """A directory for a model name: the name itself if it is one, else its cached Hub snapshot, else
    the name unchanged (the caller reports it)."""
    if os.path.isdir(name):
        return name
    return cached_snapshot(name) or name


def resolve_model_source(name: str, base_dir: str) -> str:
    """The name as the run stores it: a directory made absolute where it exists, anything else unchanged."""
    if is_packaged(name):
        return name
    for candidate in (name, os.path.join(base_dir, name)):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return name


def check_model_source(name: str, base_dir: str) -> None:
    """ModelSourceError unless ``name`` is a packaged model, a directory, or a Hub id in the local cache."""
    if is_packaged(name):
        try:
            locate(name)
        except FileNotFoundError as e:
            raise ModelSourceError(str(e)) from None
        return
    if os.path.isdir(resolve_model_source(name, base_dir)):
        return
    if cached_snapshot(name) is not None:
        return
    from_hub = name.count("/") == 1 and not name.startswith(("/", "."))
    raise ModelSourceError(
        f"model.model_name_or_path {name!r} is not a directory"
        + (", nor a Hub id in the local Hugging Face cache (nothing is downloaded: run `huggingface-cli download "
           f"{name}` where there is a network, or set HF_HOME to the cache that holds it)" if from_hub else "")
        + "; point it at a local Hugging Face model directory, e.g. --set model.model_name_or_path=/models/Llama-3.2-1B")
