"""Where ScaLoRA's tensors live inside a DeepSpeed engine: the only module that reads its internals.

Tested against deepspeed 0.19.6 to 0.19.8 (the range pinned in pyproject.toml; checkpoint.deepspeed_files owns it). The rest of the package sees a narrow
surface, in the spirit of ``deepspeed/utils/tensor_fragment.py``:

* :meth:`ZeroAccess.piece` — this rank's piece of a trainable parameter: which flat elements of the
  full parameter it holds, and writable views of their fp32 master, reduced gradient and optimizer
  moments. The pieces of all ranks tile the parameter. Under ZeRO-3 with bf16/fp16 gradients the
  gradient is an fp32 copy (DeepSpeed's ``get_local_fp32_grad_for_param``), which
  :meth:`ZeroAccess.write_back_grads` returns to DeepSpeed when the step window closes.
* :meth:`ZeroAccess.weight_slice` — the slice of a frozen weight this rank merges into: its ZeRO-3
  partition, or (ZeRO-0/1/2, where every rank holds a full replica) an equal 1/N share, after which
  :meth:`ZeroAccess.share_replica_slices` all-gathers the shares so every replica ends bit-identical.
* :meth:`ZeroAccess.join_pieces` — full tensors from every rank's pieces written into a zero-filled
  buffer (a summing all-reduce when the pieces tile the parameter, nothing at ZeRO-0 where each piece
  is a whole replica), and :meth:`ZeroAccess.all_reduce` over the data-parallel group for true sums.

Layouts handled: DeepSpeed's ZeRO-1/2 optimizer and ``BF16_Optimizer`` (flat fp32 partitions linked to
parameters through ``param._hp_mapping``), ZeRO-3 (``param.ds_tensor`` shards and flat fp32
sub-groups), and a plain torch optimizer (ZeRO disabled, fp32). The window in which reduced gradients
exist is after the boundary backward and before the ZeRO step: every method here is meant to be called
from inside the wrapped ``engine.optimizer.step``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from ..checkpoint.deepspeed_files import OLDEST_DEEPSPEED, TESTED_DEEPSPEED, supported_deepspeed
from ..checkpoint.layout import piece_numel, piece_range
from ..deepspeed_import import import_deepspeed
from ..pieces import LocalAccess, Piece, rewrite_private


def disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU accelerator from building and starting its shared-memory all-reduce op.

    On the CPU accelerator ``deepspeed.init_distributed`` JIT-compiles ``deepspeed_shm_comm`` (about
    75 s on 2 cores, 1 GB of compiler memory per file, behind a lock that hangs every later rank if the
    building one dies) and each rank then maps a 69 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file
    that is never removed: a machine that launches many short runs fills its RAM with them. The op
    serves only ``inference_all_reduce`` (inference tensor parallelism); training uses the process
    group's collectives either way. Call before ``deepspeed.init_distributed``; a no-op on GPUs.
    """
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class UnsupportedConfig(ValueError):
    """A DeepSpeed configuration ScaLoRA refuses rather than mis-train."""


ALLOW_UNTESTED = "DS_SCALORA_ALLOW_UNTESTED_DEEPSPEED"  # =1: warn instead of refusing another DeepSpeed


def check_deepspeed_version(version: str) -> None:
    """Refuse a DeepSpeed outside the tested range (this module reads its internals), unless the user opts
    in with ``DS_SCALORA_ALLOW_UNTESTED_DEEPSPEED=1``; then warn once per engine."""
    if supported_deepspeed(version):
        return
    what = (f"ds_scalora's ZeRO integration reads DeepSpeed internals and is tested with deepspeed "
            f"{OLDEST_DEEPSPEED} to {TESTED_DEEPSPEED}; found {version}")
    if os.environ.get(ALLOW_UNTESTED) == "1":
        warnings.warn(f"{what}: running anyway ({ALLOW_UNTESTED}=1). Check the results: a layout change would "
                      "break the refresh or the checkpoints, possibly silently", stacklevel=3)
        return
    raise UnsupportedConfig(f"{what}. Install a tested one (pip install deepspeed=={TESTED_DEEPSPEED}), or set "
                            f"{ALLOW_UNTESTED}=1 to run with {version} at your own risk")


class ZeroAccess:
    def __init__(self, engine):
        deepspeed = import_deepspeed()

        check_deepspeed_version(deepspeed.__version__)
        self.engine = engine
        self.opt = engine.optimizer
        self.stage = engine.zero_optimization_stage()
        _refuse_unsupported(engine)
        if self.stage == 3:
            self.kind = "zero3"
            self.group = self.opt.dp_process_group
        elif hasattr(self.opt, "single_partition_of_fp32_groups") or hasattr(self.opt, "fp32_groups_flat_partition"):
            self.kind = "fragments"  # ZeRO-1/2 or BF16_Optimizer
            self.group = self.opt.dp_process_group
        elif isinstance(self.opt, torch.optim.Optimizer):
            self.kind = "plain"
            self.group = engine.data_parallel_group if dist.is_initialized() else None
            # one for the engine's life: it maps parameters to their groups once (a fresh one per piece
            # rebuilt that map for every piece, quadratic in the number of adapted layers)
            self._local = LocalAccess(self.opt)
        else:
            raise UnsupportedConfig(
                f"ScaLoRA does not support DeepSpeed's {type(self.opt).__name__} (ZeRO stage 0 with bf16 or "
                "fp16): use ZeRO stage 1, 2 or 3 for mixed precision, or stage 0 in fp32"
            )
        self._handed_out: dict = {}  # ZeRO-3: parameter -> the gradient partition copy given out this window
        distributed = dist.is_initialized()
        self.rank = dist.get_rank(group=self.group) if distributed else 0
        self.world = dist.get_world_size(group=self.group) if distributed else 1

    # -- trainable parameters -------------------------------------------------------------------

    def piece(self, p: torch.nn.Parameter, grad: bool = True) -> Piece | None:
        """This rank's piece of ``p``, or None when the rank holds none of it. ``grad=False`` leaves the
        gradient out (``Piece.grad`` None): the only way to read masters outside the step window."""
        if self.kind == "plain":
            return self._local.piece(p, grad)
        if self.kind == "fragments":
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                return None
            addr = mapping.lp_fragment_address
            g = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1) if grad else None
            if g is not None and g.numel() == p.numel() and g.numel() != addr.numel:
                g = g.narrow(0, addr.start, addr.numel)  # BF16_Optimizer keeps full gradients
            flat = self.opt.optimizer.param_groups[mapping.param_group_index]["params"][0]
            hp = mapping.hp_fragment_address
            state = self.opt.optimizer.state.get(flat, {})
            moments = {
                k: v.narrow(0, hp.start, hp.numel)
                for k, v in state.items()
                if torch.is_tensor(v) and v.shape == flat.shape
            }
            group = self.opt.optimizer.param_groups[mapping.param_group_index]
            return Piece(addr.start, addr.numel, mapping.hp_fragment, g, moments, group, state)
        # ZeRO-3: the partition of rank k covers flat elements [k·n, (k+1)·n), the last one padded
        group_idx, offset, n = self.opt.grad_position[self.opt.get_param_id(p)]
        start = n * self.rank
        valid = max(0, min(n, p.ds_numel - start))
        if valid == 0:
            return None
        flat = self.opt.fp32_partitioned_groups_flat[group_idx]
        state = self.opt.optimizer.state.get(flat, {})
        moments = {
            k: v.narrow(0, offset, valid) for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape
        }
        g = None
        if grad:
            # an fp32 copy when DeepSpeed keeps the gradients in bf16/fp16: one per parameter and window
            # (a second piece of it sees the first one's edits, as views do at ZeRO-1/2), and
            # write_back_grads returns it
            full = self._handed_out.get(p)
            if full is None:
                full = self._handed_out[p] = self.opt.get_local_fp32_grad_for_param(p)
            g = full.narrow(0, 0, valid)
        group_id = getattr(self.opt, "sub_group_to_group_id", {}).get(group_idx, 0)  # sub-groups share a group
        group = self.opt.optimizer.param_groups[group_id]
        return Piece(start, valid, flat.narrow(0, offset, valid), g, moments, group, state)

    def write_back_grads(self) -> None:
        """End of the step window: ZeRO-3 gradients handed out by :meth:`piece` go back to DeepSpeed's
        partitions (``set_local_grad_for_param``), so the step uses what a method wrote into them. ZeRO-1/2
        pieces are views of the optimizer's own gradients: nothing to do."""
        for p, full in self._handed_out.items():
            self.opt.set_local_grad_for_param(full, p)
        self._handed_out.clear()

    def full_shape(self, p: torch.nn.Parameter) -> torch.Size:
        return p.ds_shape if self.kind == "zero3" else p.shape

    # -- frozen weights -------------------------------------------------------------------------

    def weight_slice(self, W: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
        """(flat view this rank merges into, its first element in the flattened full weight)."""
        if self.kind == "zero3":
            n = W.ds_tensor.ds_numel
            start = n * self.rank
            valid = max(0, min(n, W.ds_numel - start))
            return W.ds_tensor.data.view(-1).narrow(0, 0, valid), start
        start, stop = piece_range(W.numel(), self.world, self.rank)
        return W.data.view(-1)[start:stop], start

    def weight_numel(self, W: torch.nn.Parameter) -> int:
        return W.ds_numel if self.kind == "zero3" else W.numel()

    def weight_shape(self, W: torch.nn.Parameter) -> torch.Size:
        return W.ds_shape if self.kind == "zero3" else W.shape

    @property
    def replicated_weights(self) -> bool:
        """Whether every rank holds a full replica of the frozen weights (ZeRO-0/1/2)."""
        return self.kind != "zero3"

    def own_writable_copies(self, weights: list) -> None:
        """Rewrite, bit for bit, the part of each frozen weight this rank's merges will write.

        On the CPU, weights loaded from safetensors are copy-on-write pages of the file's mapping: the
        first merge would fault every page at the first refresh (measured on SmolLM2-135M, 210 adapted
        matrices, 2 cores: that refresh took 2.7 s against 0.8 s for the later ones). Doing it once at
        start-up keeps refreshes uniform. Replicas are rewritten whole (the shares' all-gather writes
        all of them); a ZeRO-3 partition is already a private copy. Accelerator memory is skipped.
        """
        if self.replicated_weights:
            rewrite_private(weights)

    def share_replica_slices(self, weights: list, max_bytes: int = 256 << 20) -> None:
        """All-gather each rank's merged 1/N share of every replica, in chunks of at most ``max_bytes``.

        After this, every rank's replicas are bit-identical copies of the owners' shares.
        """
        if not self.replicated_weights or self.world == 1:
            return
        batch, size = [], 0
        for W in weights:
            chunk = piece_numel(W.numel(), self.world)
            if batch and size + chunk * W.element_size() * self.world > max_bytes:
                self._gather_shares(batch)
                batch, size = [], 0
            batch.append(W)
            size += chunk * W.element_size() * self.world
        if batch:
            self._gather_shares(batch)

    def _gather_shares(self, weights: list) -> None:
        chunks = [piece_numel(W.numel(), self.world) for W in weights]
        dtype = weights[0].dtype
        if any(W.dtype != dtype for W in weights):
            for W in weights:
                self._gather_shares([W])
            return
        send = torch.zeros(sum(chunks), dtype=dtype, device=weights[0].device)
        offset = 0
        for W, chunk in zip(weights, chunks):
            own, _ = self.weight_slice(W)
            send[offset : offset + own.numel()] = own
            offset += chunk
        recv = torch.empty(self.world * send.numel(), dtype=dtype, device=send.device)
        dist.all_gather_into_tensor(recv, send, group=self.group)
        recv = recv.view(self.world, -1)
        offset = 0
        for W, chunk in zip(weights, chunks):
            flat = W.data.view(-1)
            for k in range(self.world):
                lo = min(k * chunk, flat.numel())
                hi = min(lo + chunk, flat.numel())
                flat[lo:hi] = recv[k, offset : offset + hi - lo]
            offset += chunk

    # -- communication --------------------------------------------------------------------------

    def join_pieces(self, buffer: torch.Tensor) -> torch.Tensor:
        """Full tensors from pieces: each rank wrote its pieces at their offsets into a zero-filled
        ``buffer``. Partitioned pieces are summed over ranks. At ZeRO-0 ("plain") every rank's piece is
        the whole replica, identical on all ranks (the engine averages the gradients before the step),
        so the buffer is already the result; summing it would multiply it by the world size."""
        if self.kind != "plain":
            self.all_reduce(buffer)
        return buffer

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t


def _refuse_unsupported(engine) -> None:
    """Configurations whose state this module cannot reach correctly are refused at start-up."""
    zc = engine._config.zero_config
    problems = []
    if getattr(zc, "offload_param", None) is not None and str(zc.offload_param.device).lower() not in ("none",):
        problems.append("parameter offload (zero_optimization.offload_param)")
    if getattr(zc, "offload_optimizer", None) is not None and str(zc.offload_optimizer.device).lower() not in ("none",):
        problems.append("optimizer offload (zero_optimization.offload_optimizer)")
    if getattr(zc, "zero_hpz_partition_size", 1) > 1:
        problems.append("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)")
    if getattr(zc, "zero_quantized_nontrainable_weights", False):
        problems.append("quantized non-trainable weights (zero_quantized_nontrainable_weights)")
    if getattr(zc, "mics_shard_size", -1) > 0:
        problems.append("MiCS sharding (mics_shard_size)")
    if problems:
        raise UnsupportedConfig(
            "ScaLoRA cannot run with " + "; ".join(problems) + ": the merged weights or optimizer moments "
            "would not be reachable where the refresh needs them. Remove these options from the DeepSpeed config."
        )


def find_engine(model: torch.nn.Module):
    """The DeepSpeed engine wrapping ``model``, or None. A ``TrainerCallback`` is handed the model and the
    optimizer but never the engine (the Trainer and Accelerate keep it to themselves); engines are found
    among the live objects once, at the start of training (a scan of well under a second)."""
    import gc
    import sys

    if "deepspeed" not in sys.modules:
        return None
    from deepspeed import DeepSpeedEngine

    # type(), not isinstance(): the latter reads __class__, which some module proxies answer with a warning
    found = [obj for obj in gc.get_objects() if issubclass(type(obj), DeepSpeedEngine) and obj.module is model]
    return found[-1] if found else None
