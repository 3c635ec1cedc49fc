"""Set-up shared by the speed suite (``tests/benchmarks/``, selected by ``-m benchmark`` only).

Every benchmark runs on **one thread** (torch, FAISS and the BLAS behind numpy): the figures then
do not depend on the machine's core count or on how busy its other cores are, and the suite keeps
to one core. The thread count and library versions go into each saved run's ``machine_info``; the
host name and the fluctuating CPU-clock fields are left out of it, so a saved baseline compares
cleanly on another run of the same machine type.
"""
import os
import sys
from pathlib import Path

THREADS = 1
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)  # before numpy / torch / faiss create their thread pools
os.environ.setdefault("VLBENCH_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)
faiss.omp_set_num_threads(THREADS)
try:  # numpy's BLAS is pinned by the variables above unless a plugin imported numpy first
    from threadpoolctl import threadpool_limits

    threadpool_limits(THREADS)
except ImportError:
    pass


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.pop("node", None)
    cpu = machine_info.get("cpu") or {}
    machine_info["cpu"] = {k: cpu[k] for k in ("arch", "brand_raw", "count") if k in cpu}
    machine_info["threads"] = THREADS
    machine_info["libraries"] = {"torch": torch.__version__, "numpy": np.__version__, "faiss": faiss.__version__}
