"""Layer 3: the checkpoint on disk, one owner for its format.

* :mod:`.layout` — where things lie: tag names, the ``COMPLETE`` marker, DeepSpeed's ``latest``, the
  Trainer's state file, and which slice of a flattened tensor each rank owns (``ceil(numel/N)``).
* :mod:`.shards` — the method shards beside DeepSpeed's files (ScaLoRA's merge state, ElaLoRA's
  importance averages): names, discovery, typed records with a schema version.
* :mod:`.deepspeed_files` — reading DeepSpeed's own files tensor by tensor (the pinned version's layout).
* :mod:`.reshard_files` — writing them again for another data-parallel world size.

The live engine (``ds_scalora.zero``) writes and reads shards through :mod:`.shards`; the training
loop, the exporters and reshard read everything here. Nothing here imports the live engine.
"""
