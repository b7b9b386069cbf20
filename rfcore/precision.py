"""One autocast policy for every forward pass (sweep, act-max, noise, training, analyses).

Modes: `off` (fp32); `auto` (bf16 on CUDA, fp16 on GPUs without bf16; fp32 on CPUs); `bf16` (CUDA, and
CPUs with native bfloat16 through oneDNN: elsewhere it would be emulated and slow, so fp32);
`fp16` (CUDA only).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rfcore.errors import RfatlasError

MODES = ("off", "auto", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively (fast) on `device`."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_mode(amp: bool | str | None) -> str:
    """Legacy switches as a mode: None -> auto, True -> bf16, False -> off; a mode is checked."""
    mode = {None: "auto", True: "bf16", False: "off"}.get(amp, amp) if not isinstance(amp, str) else amp
    if mode not in MODES:
        raise RfatlasError(f"unknown precision {amp!r}; choose from {', '.join(MODES)}")
    return str(mode)


def autocast_dtype(device: torch.device, amp: bool | str | None) -> torch.dtype | None:
    """The autocast dtype of `amp` on `device` (None: fp32)."""
    mode = amp_mode(amp)
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if mode == "bf16" and native_bf16(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, amp: bool | str | None) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of `amp` on `device` (a no-op context for fp32)."""
    dtype = autocast_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
