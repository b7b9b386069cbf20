"""Who holds an atlas store's lease: the `atlas` flow, and the analysis commands that write into an
existing atlas, so two writers never work on one store at once.

`hold_lease` also tags every task submitted while it is held with the lease token
(`tasks.policy.lease_tag`): tasks check it before each completion marker, on whatever worker they
run, and fail with LeaseLostError once another run took the store over.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from collections.abc import Iterator

from rfcore.store import AtlasStore
from tasks.policy import lease_tag

LEASE_TTL_S = 60.0


def lease_owner() -> str:
    """`user@host pid N [flow run NAME]`: shown to whoever finds the store leased (the lease also
    records host, pid and its start time in structured form: `rfcore.store.holder_identity`)."""
    run = ""
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        run = f" flow run {flow_run.name}" if flow_run.id else ""
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}{run}"


@contextlib.contextmanager
def hold_lease(store: AtlasStore, what: str = "", ttl_s: float = LEASE_TTL_S) -> Iterator[str]:
    """Hold `store`'s lease and tag the tasks submitted meanwhile with its token; yields the token."""
    from prefect import tags

    owner = f"{lease_owner()} ({what})" if what else lease_owner()
    with store.lease(owner, ttl_s=ttl_s) as token, tags(lease_tag(token)):
        yield token


@contextlib.contextmanager
def store_lease(store_url: str, what: str) -> Iterator[None]:
    """Hold the lease of the atlas at `store_url` while `what` writes into it (StoreLockedError if a
    live run holds it)."""
    with hold_lease(AtlasStore.open(store_url, "r+"), what):
        yield
