"""User-facing errors: each carries a one-line message the CLI prints as is (exit code 2)."""

from __future__ import annotations


class RfatlasError(Exception):
    """Base class for every error caused by bad input or an unusable resource."""


class UnknownModelError(RfatlasError):
    """The model name is not in the registry."""


class UnknownLayerError(RfatlasError):
    """A requested layer is not an analyzable layer of the model."""


class CheckpointError(RfatlasError):
    """A checkpoint is unreadable, unsafe, or does not fit the model."""


class DataError(RfatlasError):
    """A data source is missing, empty, malformed, or unreachable."""


class StoreError(RfatlasError):
    """An atlas store is unreachable, malformed, or of another schema version."""


class StoreLockedError(StoreError):
    """Another live run holds the store's lease."""


class ConfigMismatchError(StoreError):
    """The store was made by a run whose identity (model, data, k, ...) differs."""


class LeaseLostError(StoreError):
    """This run no longer holds the store's lease (another run took it over): it must stop writing."""
