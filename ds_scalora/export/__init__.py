"""Layer 4 helpers: turning a run's checkpoint into things other tools load.

``source`` finds the checkpoint and the run behind it, ``weights`` streams every parameter's effective
value (frozen weight with all merges at full precision + the adapter's delta), and the exporters build
on it: ``merged`` (a Hugging Face model), ``peft_export`` (a PEFT LoRA adapter from a truncated SVD),
``inspect`` (spectra and ranks of the accumulated update) and ``reshard`` (another world size). Only
``ds_scalora.checkpoint`` reads the checkpoint files (DeepSpeed's and the method shards).
"""

from .source import ExportError, RunSource, resolve_checkpoint

__all__ = ["ExportError", "RunSource", "resolve_checkpoint"]
