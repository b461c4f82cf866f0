"""The machine and the versions a benchmark ran with (the report's first table)."""
from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from typing import Optional

import torch


def machine_info(device: Optional[str] = None) -> dict[str, str]:
    """CPU model, cores, RAM, GPU (if any), load average, and the versions that matter."""
    import psutil
    from torch.utils import collect_env

    cpu = re.search(r"Model name:\s*(.+)", collect_env.get_cpu_info(collect_env.run) or "")
    info = {"cpu": cpu.group(1).strip() if cpu else "unknown", "cpu_cores": str(os.cpu_count()),
            "torch_threads": str(torch.get_num_threads()), "ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
            "gpu": "none"}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device).index or 0 if device else 0)
        info["cuda"] = str(torch.version.cuda)
    info["load_average_1_5_15"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["python"] = platform.python_version()
    for package in ("torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info
