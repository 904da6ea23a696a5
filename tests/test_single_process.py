"""``python launch/train.py`` without a launcher is a one-rank run; under a launcher or MPI nothing is set."""

from __future__ import annotations

import os

import pytest

from ds_scalora.zero.single_process import LAUNCHED, one_rank_if_not_launched

ONE_RANK = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for key in {*LAUNCHED, *ONE_RANK, "SLURM_STEP_NUM_TASKS"}:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_launcher_gives_one_rank_on_a_free_local_port(clean_env):
    assert one_rank_if_not_launched() is True
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")] == ["0", "0", "1", "127.0.0.1"]
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536


def test_a_port_already_chosen_is_kept(clean_env):
    clean_env.setenv("MASTER_PORT", "29777")
    assert one_rank_if_not_launched() is True and os.environ["MASTER_PORT"] == "29777"
    for key in ONE_RANK:
        clean_env.delenv(key)
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task srun step is one rank too
    assert one_rank_if_not_launched() is True


@pytest.mark.parametrize("key", ["RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_a_launcher_or_mpi_is_left_to_deepspeed(clean_env, key):
    clean_env.setenv(key, "4")
    assert one_rank_if_not_launched() is False
    assert not {"LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
