"""Retry policy: transient I/O errors are retried with backoff, bad input is not."""

from __future__ import annotations

from prefect.states import Failed

from rfcore.errors import ConfigMismatchError, DataError, StoreError, UnknownLayerError
from tasks import atlas as T
from tasks.policy import GPU_TAG, RETRIES, RETRY_DELAYS, is_transient, retry_transient
from tasks.train import train_model


class ServerDisconnectedError(Exception):  # same name as aiohttp's: matched by name
    pass


def test_transient_errors_are_retried() -> None:
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(5, "I/O error"))
    assert is_transient(ServerDisconnectedError())
    wrapped = StoreError("store unreachable")
    wrapped.__cause__ = ConnectionRefusedError()
    assert is_transient(wrapped)


def test_bad_input_is_not_retried() -> None:
    for exc in (
        DataError("bad spec"),
        UnknownLayerError("no layer"),
        ConfigMismatchError("other run"),
        FileNotFoundError("x"),
        PermissionError("x"),
        ValueError("x"),
        KeyError("x"),
    ):
        assert not is_transient(exc), exc
    wrapped = DataError("no such file")
    wrapped.__cause__ = FileNotFoundError()
    assert not is_transient(wrapped)


def test_retry_condition_reads_the_failed_state() -> None:
    assert retry_transient(None, None, Failed(data=ConnectionResetError("reset")))
    assert not retry_transient(None, None, Failed(data=DataError("bad")))


def test_task_options() -> None:
    assert RETRY_DELAYS == [2, 4, 8] and RETRIES == 3
    for t in (T.sweep_shard, train_model):
        assert GPU_TAG in t.tags
        assert t.retries == RETRIES and t.retry_condition_fn is retry_transient
    for t in (T.merge_layer, T.crop_patches, T.prepare_store):
        assert GPU_TAG not in t.tags and t.retries == RETRIES
    assert T.sweep_shard.task_run_name.format(shard=7, num_shards=50) == "sweep[shard=0007/0050]"
    assert T.merge_layer.task_run_name.format(layer="layer1.0.conv2") == "merge[layer=layer1.0.conv2]"
