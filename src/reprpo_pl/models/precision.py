"""Which precision a run uses by default, and running evaluation under the run's precision.

bf16-mixed where it pays: on a GPU, and on a CPU whose flags report AVX512-BF16 or AMX-BF16, where a
2-thread bf16 GEMM of SmolLM2's shapes runs ~4.5x the fp32 rate (issue 13's measurement); fp32
elsewhere. ``trainer.precision=32-true`` on the command line always wins (it replaces the resolver).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import ContextManager

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def default_precision() -> str:
    """``${precision:}``: ``bf16-mixed`` on CUDA or a CPU with native bf16 matmuls, else ``32-true``."""
    if torch.cuda.is_available() or any(flag in cpu_flags() for flag in BF16_CPU_FLAGS):
        return "bf16-mixed"
    return "32-true"


def precision_context(precision: str, device: torch.device | str) -> ContextManager[None]:
    """The autocast context Lightning's precision plugin gives a training step, for code outside one
    (evaluation, generation, eval from a checkpoint): ``bf16-mixed``/``16-mixed`` autocast on ``device``'s
    type, nothing for true precisions."""
    if str(precision).endswith("-mixed"):
        device_type = torch.device(device).type
        return MixedPrecision(str(precision), "cuda" if device_type == "cuda" else "cpu").forward_context()
    return contextlib.nullcontext()
