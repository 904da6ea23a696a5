"""Writing exports safely: a temporary directory next to OUT, moved into place only when complete, and
sharded safetensors written as they fill, so that no more than one shard is ever held in memory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch

from .source import ExportError


@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool = False):
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out``, on error it goes."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} already exists; choose another output or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.replace(out, os.path.join(old, "x"))
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KB"`` or a number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class ShardedSafetensorsWriter:
    """HF's sharded layout (``model-0000i-of-0000n.safetensors`` + index, or one ``model.safetensors``)."""

    def __init__(self, directory: str, max_shard_bytes: int, prefix: str = "model"):
        self.dir, self.max, self.prefix = directory, max_shard_bytes, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.dir, f".part{len(self.files):05d}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            final = os.path.join(self.dir, f"{self.prefix}.safetensors")
            os.replace(self.files[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self.files):
            base = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.dir, base))
            finals.append(os.path.join(self.dir, base))
            weight_map.update({name: base for name in names})
        with open(os.path.join(self.dir, f"{self.prefix}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return finals
