"""Launch ``zero_worker.py`` under the DeepSpeed launcher on this machine (CPU accelerator, gloo).

* ``run_deepspeed(num_ranks, args, tmp_path, timeout)``: one launcher, DeepSpeed's per-node
  ``python -m deepspeed.launcher.launch --world_info=<b64 {"localhost": [0..N-1]}> ... zero_worker.py <args>
  --out <tmp>/...``, the command ``deepspeed --num_gpus N`` execs (its runner is tested elsewhere).
* ``SharedLaunch(num_ranks)``: runs that test modules register at import (``add(key, args)``) and that
  all go through one launch (``zero_worker.py --plan``) at the first ``result(key, tmp_path_factory)``:
  start-up is paid once instead of per run (a 2-rank launch is ~29 s on 2 cores, ~20 s of it start-up;
  the equivalence tests' eleven runs took 46 s in one). ``SHARED_2_RANKS`` is the one they share.
* ``run_deepspeed_two_nodes(ranks_per_node, args, tmp_path, timeout, launcher=...)``: two launcher
  processes that rendezvous over loopback as two "nodes" (node_rank 0 and 1), no ssh/pdsh:

  - ``launcher="deepspeed"`` (default): each node runs
    ``deepspeed --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1 --master_port P worker ...``
    with ``H`` = ``node0 slots=n`` / ``node1 slots=n`` (names are only dictionary keys: never resolved,
    never ssh'ed). ``--no_ssh`` makes runner.py skip the ssh check and the PDSH runner and exec
    ``python -m deepspeed.launcher.launch --world_info=<b64> --node_rank=R ...`` locally; launch.py
    gives node R the global ranks R*n .. R*n+n-1, ``WORLD_SIZE=2n``, ``CROSS_RANK=R``, ``CROSS_SIZE=2``.
    Without ``--no_ssh`` the runner ssh-checks the first host; without a hostfile ``--num_nodes 2``
    raises "Num nodes is >1 but no extra nodes available via hostfile".
  - ``launcher="launch"``: the same low-level ``python -m deepspeed.launcher.launch`` command with a
    hand-made ``--world_info`` (base64 JSON ``{"node0": [0..n-1], "node1": [0..n-1]}``).
  - ``launcher="torchrun"``: ``python -m torch.distributed.run --nnodes 2 --node_rank R
    --nproc_per_node n --master_addr 127.0.0.1 --master_port P worker ...`` (static c10d rendezvous;
    ``deepspeed.init_distributed`` picks up RANK/WORLD_SIZE/MASTER_* from the environment).

Each call returns the dictionary rank 0 wrote (see ``reference.py``), or raises ``LaunchError`` with
the command and the tail of the log. The environment gets ``DS_ACCELERATOR=cpu`` and, unless already
set, ``OMP_NUM_THREADS=1`` (the ranks share the machine's cores).

CLI (for debugging)::

    python tests/distributed/launch.py --ranks 2 [--two-nodes deepspeed|launch|torchrun] -- --stage 2 --steps 6 ...
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from ds_scalora.zero.single_process import free_port  # noqa: F401 (the tests import it from here)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "zero_worker.py"


# Launches whose path another default test already takes (each says which, where it is marked) run only
# with DS_SCALORA_DIST_EXTENDED=1, so that the README's test command stays well under 30 minutes on 2 cores.
EXTENDED_ON = os.environ.get("DS_SCALORA_DIST_EXTENDED") == "1"
EXTENDED = pytest.mark.skipif(not EXTENDED_ON, reason="set DS_SCALORA_DIST_EXTENDED=1 (extra launches)")


class LaunchError(RuntimeError):
    pass


def _env() -> dict:
    env = os.environ.copy()
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LOCAL_SIZE", None)  # the launcher sets it per node
    return env


def _tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "<no log>"
    return "\n".join(text[-lines:])


def _kill(proc: subprocess.Popen) -> None:
    """Terminate the launcher and the ranks it spawned (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _with_out(args, out: Path) -> list[str]:
    args = [str(a) for a in args]
    if "--out" in args:
        raise ValueError("run_* sets --out itself")
    return args + ["--out", str(out)]


def _run_all(cmds: list[list[str]], logs: list[Path], out: Path, timeout: float) -> dict:
    """Start every command (each in its own session), wait for all, load ``out``."""
    env = _env()
    procs, files = [], []
    t0 = time.perf_counter()
    try:
        for cmd, log in zip(cmds, logs):
            f = open(log, "w")
            files.append(f)
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            procs.append(
                subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            )
        failed = None
        for proc, log in zip(procs, logs):
            left = max(1.0, timeout - (time.perf_counter() - t0))
            try:
                rc = proc.wait(left)
            except subprocess.TimeoutExpired:
                failed = (log, f"timed out after {timeout:.0f} s")
                break
            if rc != 0:
                failed = (log, f"exit status {rc}")
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
        for f in files:
            f.close()
    if failed is not None:
        log, why = failed
        others = "".join(f"\n--- {other} ---\n{_tail(other, 30)}" for other in logs if other != log)
        raise LaunchError(f"DeepSpeed run failed ({why}); log {log}:\n{_tail(log)}{others}")
    if not out.exists():
        raise LaunchError(f"the run wrote no result {out}; log {logs[0]}:\n{_tail(logs[0])}")
    result = torch.load(out, weights_only=True)
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    result["meta"]["logs"] = [str(p) for p in logs]
    return result


def node_launcher(num_ranks: int, script, args) -> list[str]:
    """The command ``deepspeed --num_gpus N script args`` (DeepSpeed's runner) execs for one node: its per-node
    launcher ``python -u -m deepspeed.launcher.launch`` with ``num_ranks`` local ranks on a free port. Calling it
    directly saves the runner's own start (its ``import deepspeed``: 6-7 s measured on the 2-core machine,
    before the ranks start); the runner itself runs where a test is about the user's command
    (test_train_entry.py: the 2-rank runs of every method, two nodes through a hostfile; test_examples.py).
    The module runs as ``-m`` would run it (``runpy``), after DeepSpeed's package was imported the way the
    ranks import it (``ds_scalora.deepspeed_import``: without the mlflow its autotuner would import, ~2.5 s
    of CPU before the ranks start); its code and arguments are DeepSpeed's own."""
    info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(num_ranks))}).encode()).decode()
    return [
        sys.executable, "-u", "-c", _PER_NODE_LAUNCHER, f"--world_info={info}", "--node_rank=0",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args),
    ]  # fmt: skip


# ``python -m deepspeed.launcher.launch``, with DeepSpeed imported first as the ranks import it
_PER_NODE_LAUNCHER = ("from ds_scalora.deepspeed_import import import_deepspeed; import_deepspeed(); import runpy; "
                      "runpy.run_module('deepspeed.launcher.launch', run_name='__main__', alter_sys=True)")


def run_deepspeed(num_ranks: int, args, tmp_path, timeout: float = 600, name: str | None = None,
                  worker: Path = WORKER) -> dict:
    """``num_ranks`` ranks of ``worker`` on this machine; returns rank 0's result dictionary.

    The command is :func:`node_launcher`: nothing here is about DeepSpeed's runner, which the tests of
    ``launch/train.py`` and the examples run (see there)."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    name = name or f"ds{num_ranks}_{int(time.time() * 1000) % 10**8}"
    out = tmp_path / f"{name}.pt"
    cmd = node_launcher(num_ranks, worker, _with_out(args, out))
    return _run_all([cmd], [tmp_path / f"{name}.log"], out, timeout)


class SharedLaunch:
    """Runs of ``zero_worker.py`` at one world size that share one launch (see the module docstring).

    Every run registered by the modules imported in this pytest session goes into the one launch, whichever
    of their tests are selected. ``{dir}`` in a run's arguments becomes the launch's directory (for a
    checkpoint a later launch resumes from). A failed launch fails every test that uses it, with its log."""

    def __init__(self, num_ranks: int):
        self.num_ranks = num_ranks
        self.runs: dict[str, list[str]] = {}
        self.results: dict[str, dict] = {}
        self.error: LaunchError | None = None
        self.dir: Path | None = None

    def add(self, key: str, args) -> str:
        if key in self.runs:
            raise ValueError(f"a shared run named {key!r} is already registered")
        self.runs[key] = [str(a) for a in args]
        return key

    def result(self, key: str, tmp_path_factory) -> dict:
        if key not in self.results and self.error is None:
            pending = {k: args for k, args in self.runs.items() if k not in self.results}
            self.dir = Path(tmp_path_factory.mktemp(f"shared{self.num_ranks}"))
            try:
                self.results.update(run_deepspeed_plan(self.num_ranks, pending, self.dir))
            except LaunchError as e:
                self.error = e
        if self.error is not None:
            raise self.error
        return self.results[key]


SHARED_2_RANKS = SharedLaunch(2)


def run_deepspeed_plan(num_ranks: int, runs: dict[str, list], tmp_path, timeout: float | None = None,
                       worker: Path = WORKER) -> dict:
    """Every run of ``runs`` (key -> ``worker`` arguments) in one launch (``--plan``, plan.py); returns key ->
    the result rank 0 wrote."""
    tmp_path = Path(tmp_path)
    outs = {key: tmp_path / f"{key}.pt" for key in runs}
    plan = [_with_out([str(a).replace("{dir}", str(tmp_path)) for a in args], outs[key]) for key, args in runs.items()]
    (tmp_path / "plan.json").write_text(json.dumps(plan, indent=1))
    cmd = node_launcher(num_ranks, worker, ["--plan", tmp_path / "plan.json"])
    last = outs[list(runs)[-1]]
    _run_all([cmd], [tmp_path / "plan.log"], last, timeout or 300 + 60 * len(runs))
    results = {}
    for key, out in outs.items():
        results[key] = torch.load(out, weights_only=True)
        results[key].setdefault("meta", {})["logs"] = [str(tmp_path / "plan.log")]
    return results


def run_deepspeed_two_nodes(
    ranks_per_node: int, args, tmp_path, timeout: float = 600, launcher: str = "deepspeed", name: str | None = None
) -> dict:
    """Two launcher processes as node 0 and node 1 on loopback (see the module docstring)."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    name = name or f"2nodes_{launcher}_{int(time.time() * 1000) % 10**8}"
    out = tmp_path / f"{name}.pt"
    port = str(free_port())
    worker = [str(WORKER), *_with_out(args, out)]
    n = str(ranks_per_node)
    cmds = []
    for node in (0, 1):
        if launcher == "deepspeed":
            hostfile = tmp_path / f"{name}.hostfile"
            hostfile.write_text(f"node0 slots={n}\nnode1 slots={n}\n")
            cmd = [
                sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, *worker,
            ]  # fmt: skip
        elif launcher == "launch":
            info = {"node0": list(range(ranks_per_node)), "node1": list(range(ranks_per_node))}
            b64 = base64.urlsafe_b64encode(json.dumps(info).encode()).decode()
            cmd = [
                sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={b64}",
                f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", *worker,
            ]  # fmt: skip
        elif launcher == "torchrun":
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                "--nproc_per_node", n, "--master_addr", "127.0.0.1", "--master_port", port, *worker,
            ]  # fmt: skip
        else:
            raise ValueError(f"unknown launcher {launcher!r}")
        cmds.append(cmd)
    logs = [tmp_path / f"{name}.node{node}.log" for node in (0, 1)]
    return _run_all(cmds, logs, out, timeout)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="run zero_worker.py under the DeepSpeed launcher (CPU)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (per node with --two-nodes)")
    p.add_argument("--two-nodes", choices=["deepspeed", "launch", "torchrun"], default=None)
    p.add_argument("--tmp", default=None, help="directory for logs and the result (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then zero_worker.py arguments (no --out)")
    a = p.parse_args(argv)
    worker_args = a.worker_args[1:] if a.worker_args[:1] == ["--"] else a.worker_args
    tmp = Path(a.tmp or tempfile.mkdtemp(prefix="zero_worker_"))
    if a.two_nodes:
        r = run_deepspeed_two_nodes(a.ranks, worker_args, tmp, a.timeout, launcher=a.two_nodes)
    else:
        r = run_deepspeed(a.ranks, worker_args, tmp, a.timeout)
    print(json.dumps({"losses": r["losses"], "grad_norms": r["grad_norms"], "meta": r["meta"]}, indent=1))


if __name__ == "__main__":
    main()
