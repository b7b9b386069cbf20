"""rfatlas core: receptive fields and preferred stimuli of CNN units (pure library: torch, numpy, zarr)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rfcore.atlas import open_atlas

__all__ = ["__version__", "open_atlas"]


def __getattr__(name: str) -> Any:
    """`rfcore.open_atlas` without importing torch and zarr on `import rfcore`."""
    if name == "open_atlas":
        from rfcore.atlas import open_atlas

        return open_atlas
    raise AttributeError(f"module 'rfcore' has no attribute {name!r}")
