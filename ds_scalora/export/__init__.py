"""Layer 4 helpers: turning a run's checkpoint into things other tools load.

``source`` finds the checkpoint and the run behind it, ``weights`` streams every parameter's effective
value (frozen weight with all merges at full precision + the adapter's delta), and the exporters build
on it: ``merged`` (a Hugging Face model), ``peft_export`` (a PEFT LoRA adapter from a truncated SVD),
``inspect`` (spectra and ranks of the accumulated update) and ``reshard`` (another world size). Only
``ds_scalora.checkpoint`` reads the checkpoint files (DeepSpeed's and the method shards).
"""

from importlib import import_module

__all__ = ["ExportError", "RunSource", "resolve_checkpoint"]


def __getattr__(name):
    """The names of ``source``, imported on first use: ``source`` reads DeepSpeed's files and so imports
    DeepSpeed (seconds), which the run config, importing ``final_model`` to validate its choice, must not pay
    before it can reject bad input."""
    if name in __all__:
        return getattr(import_module(".source", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
