"""rfatlas core: receptive fields and preferred stimuli of CNN units (pure library: torch, numpy, zarr)."""

from __future__ import annotations

__version__ = "0.1.0"
