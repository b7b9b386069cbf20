"""rfcore.memory: freed buffers are reused from the heap instead of being page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource
import torch
from rfcore.memory import retain_freed_memory
ok = retain_freed_memory()
x, w = torch.randn(32, 16, 64, 64), torch.randn(16, 16, 3, 3)
def batch():  # an 8 MiB activation and its ReLU, freed at once: what every batch of a sweep does
    return torch.relu(torch.nn.functional.conv2d(x, w, padding=1)).sum()
for _ in range(3):  # warm up: the first buffers are faulted in either way
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(int(ok), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "1", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    applied, faults = _probe()
    default, default_faults = _probe(RFATLAS_MALLOC="default")
    assert applied and not default
    # by default the buffers are unmapped on free and faulted in again every batch
    assert default_faults > 2_000
    assert faults < default_faults / 20
