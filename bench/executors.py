"""Executors: where a grid's cells are computed. The driver (``bench.runner.execute``) stores every
result itself, with the atomic writers of ``bench/results.py``, the moment it arrives.

An executor knows nothing of cells' contents: the runner hands it a ``Work`` (compute a cell here,
the importable task function and arguments that compute it on a worker, the record of a lost cell,
and where to store a result), so this module imports nothing of the runner's and the runner
imports it one way.

* ``local`` (default): one cell after another in this process, as always.
* ``ray``: each cell is a Ray task (``num_cpus=cpus_per_task``, and ``num_gpus=1`` with a CUDA
  device). A task returns the cell's record and artifact to the driver; workers write nothing. Ray
  is an optional extra (``pip install -r requirements-ray.txt``), imported only here, only when
  asked for.

What a worker needs, found through shared paths (nothing is shipped but the cell's description):
the project's code (Ray puts the repository root on the workers' ``PYTHONPATH``), the driver's
working directory (the task runs there, so relative paths mean the same), the data root and the
cache dir (features, expert buffers, forgetting statistics), all at the same path on every node.
The driver builds those caches before dispatching (the protocol's features, then each method's
``prepare`` hook), so workers only read them; a worker rebuilds the protocol from its config once
per process (cached features: cheap) and checks that its protocol id is the driver's.

Failures: a cell that raises is a failed record, as locally. A task whose worker process or node
dies is rerun by Ray ``max_retries`` times (default 1: a lost node or a preempted machine is worth
one more try, while a cell that kills its worker every time, e.g. out of memory, costs at most twice
before it is recorded as failed); after that the driver records the cell as failed and the grid goes
on. A rerun of the same command redoes exactly the cells that are not done.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from dataclasses import dataclass
from typing import Any, Optional

from bench.errors import BenchError
from bench.progress import progress

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ExecutorConfig:
    """Where cells run: ``local`` (one after another in this process; the default) or ``ray`` (each
    cell a Ray task)."""
    kind: str = "local"
    address: Optional[str] = None  # ray: None = a new local instance (or $RAY_ADDRESS); "auto"; "HOST:PORT"
    cpus_per_task: int = 1  # ray: CPUs (and torch threads) per cell; one GPU per cell with device cuda
    max_retries: int = 1  # ray: reruns of a cell whose worker process or node died (not of a cell that raised)


@dataclass
class Work:
    """What an executor needs of a grid, given by the runner.

    ``compute(cell)`` computes a cell in this process; ``task`` is an importable module-level function
    that computes one on a worker from ``task_args(cell)`` (plain, picklable values); ``lost(cell,
    error, traceback, seconds)`` is the result of a cell whose worker died; ``store(cell, result)``
    writes a result (the driver's job); ``gpu`` asks one GPU per task; ``worker_run`` is put in Ray's
    object store once and passed to every task as its second argument."""
    compute: Callable[[Any], Any]
    task: Callable[..., Any]
    task_args: Callable[[Any], tuple]
    lost: Callable[[Any, str, str, float], Any]
    store: Callable[[Any, Any], None]
    worker_run: Any = None
    gpu: bool = False


class LocalExecutor:
    """Today's behaviour: every cell in this process, in plan order."""

    def __init__(self, cfg: ExecutorConfig, log: Callable = print):
        self.log = log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, cells: list, work: Work) -> None:
        for c in cells:
            work.store(c, work.compute(c))


class RayExecutor:
    """Each cell a Ray task; results come back to the driver as they finish (``ray.wait``)."""

    def __init__(self, cfg: ExecutorConfig, log: Callable = print):
        try:
            import ray
        except ImportError:
            raise BenchError("--executor ray needs Ray, an optional extra: pip install -r requirements-ray.txt "
                             "(on every node)") from None
        if cfg.cpus_per_task < 1:
            raise BenchError(f"CPUs per Ray task must be at least 1, got {cfg.cpus_per_task}")
        if cfg.max_retries < 0:
            raise BenchError(f"Ray max_retries must be >= 0, got {cfg.max_retries}")
        self.ray, self.cfg, self.log, self.started = ray, cfg, log, False
        if not ray.is_initialized():
            try:
                ray.init(address=cfg.address, include_dashboard=False, logging_level="WARNING")
            except Exception as e:  # ConnectionError, ValueError, RuntimeError, ...: one line
                where = f"at {cfg.address}" if cfg.address else "(a new local instance)"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BenchError(f"cannot start or reach Ray {where}: {first}") from None
            self.started = True
        res = ray.cluster_resources()
        log(f"ray: {len([n for n in ray.nodes() if n.get('Alive')])} node(s), {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.ray.shutdown()
        return False

    def run(self, cells: list, work: Work) -> None:
        if not cells:
            return
        ray, cfg, gpu = self.ray, self.cfg, work.gpu
        res = ray.cluster_resources()
        if gpu and res.get("GPU", 0) < 1:
            self.log("warning: --device cuda but the Ray cluster has no GPU now; tasks wait until one joins")
        pythonpath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        opts = dict(num_cpus=cfg.cpus_per_task, num_gpus=1 if gpu else 0, max_retries=cfg.max_retries,
                    retry_exceptions=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        task = ray.remote(work.task).options(**opts)
        run_ref = ray.put(work.worker_run)
        refs = {task.remote(a[0], run_ref, *a[1:]): (c, time.time()) for c in cells for a in [work.task_args(c)]}
        pending = list(refs)
        self.log(f"ray: {len(pending)} cells submitted ({cfg.cpus_per_task} CPU{'s' if cfg.cpus_per_task > 1 else ''}"
                 f"{' + 1 GPU' if gpu else ''} each)")
        n_done = 0
        try:
            with progress(total=len(pending), desc="cells", unit="cell") as bar:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    cell, t0 = refs[ready[0]]
                    try:
                        result = ray.get(ready[0])
                    except ray.exceptions.RayError as e:  # the worker or its node died, or the task could not run
                        result = work.lost(cell, ray_error_message(e), str(e), time.time() - t0)
                    work.store(cell, result)
                    n_done += 1
                    bar.update(1)
                    r = result.record
                    state = (f"ok, mean {r['metrics_mean']['mean']:.1f}" if r.get("status") == "ok"
                             else f"FAIL {r.get('error', '')}")
                    self.log(f"[{n_done}/{len(refs)}] stored {cell.label}: {state}")
        finally:
            for ref in pending:  # interrupted: cells in flight are lost (a rerun redoes them)
                ray.cancel(ref, force=True)


def ray_error_message(e: BaseException) -> str:
    """One line for a cell's record: the cause's type and first line."""
    cause = getattr(e, "cause", None)
    err = cause if isinstance(cause, BaseException) else e
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def make_executor(cfg: ExecutorConfig, log: Callable = print):
    if cfg.kind == "local":
        return LocalExecutor(cfg, log)
    if cfg.kind == "ray":
        return RayExecutor(cfg, log)
    raise BenchError(f"unknown executor {cfg.kind!r}; available: local, ray")
