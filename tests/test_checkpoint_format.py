"""The checkpoint package's own format rules (ds_scalora.checkpoint): the rank-slice rule against
ZeRO-3's pad-and-split, the method shards' names and discovery, and their schema: records round-trip
typed, an older (pre-schema) file is read, a newer one, another kind or a damaged record is refused
with the reason."""

from __future__ import annotations

import pytest
import torch

from ds_scalora.checkpoint import layout, shards
from ds_scalora.checkpoint.deepspeed_files import CheckpointFileError


@pytest.mark.parametrize("numel", [0, 1, 5, 12, 13, 97])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_piece_range_is_zero3_pad_and_split(numel, world):
    # reference: pad the flattened tensor with zeros to a multiple of world and cut equal rows
    padded = torch.nn.functional.pad(torch.arange(numel) + 1, (0, (-numel) % world)).view(world, -1)
    for rank in range(world):
        lo, hi = layout.piece_range(numel, world, rank)
        want = padded[rank][padded[rank] > 0] - 1
        assert torch.equal(torch.arange(lo, hi), want), (numel, world, rank)
        assert layout.piece_numel(numel, world) == padded.shape[1]


def _scalora(rank: int, world: int) -> shards.ScaLoRAShard:
    return shards.ScaLoRAShard(config={"precision": "fp32"}, totals={"refreshes": 3}, world=world,
                               layers=["a", "b"], rank=rank, merge_state=[torch.ones(3) * rank, None],
                               sketches={rank: torch.eye(2)})  # fmt: skip


def test_shards_round_trip_and_are_found(tmp_path):
    for rank in range(2):
        shards.write(shards.shard_path(str(tmp_path), rank, 2, "scalora"), _scalora(rank, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds_scalora_rank00000_of00002.pt", "ds_scalora_rank00001_of00002.pt"]
    paths = shards.find(str(tmp_path), "scalora", 2)
    back = shards.read(paths[1], "scalora")
    assert isinstance(back, shards.ScaLoRAShard) and back.rank == 1 and back.layers == ["a", "b"]
    assert torch.equal(back.merge_state[0], torch.ones(3)) and back.merge_state[1] is None
    assert torch.equal(back.sketches[1], torch.eye(2)) and back.totals == {"refreshes": 3}
    assert torch.load(paths[0], weights_only=True)["schema"] == shards.SCHEMA_VERSION
    assert shards.find(str(tmp_path), "elalora", 2) == []
    with pytest.raises(CheckpointFileError, match=r"written for \[2\] ranks, DeepSpeed files for 4"):
        shards.find(str(tmp_path), "scalora", 4)
    assert shards.other_world(str(tmp_path), "scalora", 4) == "ds_scalora_rank00000_of00002.pt"
    (tmp_path / "ds_scalora_rank00001_of00002.pt").unlink()
    with pytest.raises(CheckpointFileError, match="missing scalora shard ds_scalora_rank00001_of00002.pt"):
        shards.find(str(tmp_path), "scalora", 2)


def test_old_shards_are_read_and_newer_or_foreign_ones_refused(tmp_path):
    old = tmp_path / "old.pt"  # as written before the schema existed: plain dict, same fields
    torch.save({"layers": ["a"], "ema": {"0/A": torch.zeros(2, 3)}}, old)
    assert shards.read(str(old), "elalora").ema["0/A"].shape == (2, 3)
    newer = tmp_path / "newer.pt"
    torch.save({"schema": shards.SCHEMA_VERSION + 1, "kind": "elalora", "layers": [], "ema": {}}, newer)
    with pytest.raises(CheckpointFileError, match="newer version; upgrade ds-scalora"):
        shards.read(str(newer), "elalora")
    foreign = tmp_path / "foreign.pt"
    shards.write(str(foreign), _scalora(0, 1))
    with pytest.raises(CheckpointFileError, match="holds scalora state where elalora state was expected"):
        shards.read(str(foreign), "elalora")
    damaged = tmp_path / "damaged.pt"
    torch.save({"schema": 1, "kind": "scalora", "layers": ["a"]}, damaged)
    with pytest.raises(CheckpointFileError, match="scalora shard without config, totals, world, rank, merge_state"):
        shards.read(str(damaged), "scalora")
    (tmp_path / "trunc.pt").write_bytes(foreign.read_bytes()[:100])
    with pytest.raises(CheckpointFileError, match="truncated, damaged"):
        shards.read(str(tmp_path / "trunc.pt"), "scalora")


def test_marker_and_tags(tmp_path):
    root = tmp_path / layout.CHECKPOINTS_DIR
    for step in (3, 6, 9):
        (root / layout.tag_for(step)).mkdir(parents=True)
    layout.mark_complete(str(root / layout.tag_for(3)), 3)
    layout.mark_complete(str(root / layout.tag_for(9)), 9)
    assert layout.step_tags(str(root)) == (["step00000003", "step00000009"], ["step00000006"])
    assert (root / "step00000009" / "COMPLETE").read_text() == "9\n"
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        layout.latest_tag(str(root))


class _AsPython3112:
    """Pickles like Python 3.11.0-3.11.4 pickle an enum member: getattr(cls, name) (DeepSpeed's ZeroStageEnum in
    the optimizer files a run on Debian 12's system Python writes)."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_enum_members_pickled_by_getattr_load_and_nothing_else_does(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from ds_scalora.checkpoint.deepspeed_files import load

    good = tmp_path / "optim.pt"
    torch.save({"zero_stage": _AsPython3112(ZeroStageEnum, "gradients"), "w": torch.ones(2)}, good)
    assert load(str(good))["zero_stage"] is ZeroStageEnum.gradients
    for cls, name in ((ZeroStageEnum, "__class__"), (dict, "fromkeys"), (ZeroStageEnum, "missing")):
        bad = tmp_path / f"{name}.pt"
        torch.save({"x": _AsPython3112(cls, name)}, bad)
        with pytest.raises(CheckpointFileError):
            load(str(bad))
