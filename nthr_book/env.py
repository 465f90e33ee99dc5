"""Environment report (the first code cell of every notebook), library versions for provenance,
seeding."""

from __future__ import annotations

import importlib.metadata
import platform
import random

from nthr_book import config

_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "math-verify", "ipywidgets", "trl")


def versions() -> dict[str, str]:
    """Versions of Python, the key libraries and nthr_book (missing ones as 'not installed')."""
    import nthr_book

    out = {"python": platform.python_version(), "nthr_book": nthr_book.__version__}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description() -> str:
    """The compute device in words."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda: {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report() -> dict[str, str]:
    """Print (and return) versions, device and run mode; every notebook's first code cell calls
    it."""
    info = versions() | {"device": device_description(), "mode": config.mode_name()}
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return info


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA): the one place determinism is set."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
