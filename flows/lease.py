"""Who holds an atlas store's lease: the `atlas` flow, and the analysis commands that write into an
existing atlas, so two writers never work on one store at once."""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from collections.abc import Iterator

from rfcore.store import AtlasStore

LEASE_TTL_S = 60.0


def lease_owner() -> str:
    """`user@host pid N [flow run NAME]`: shown to whoever finds the store leased."""
    run = ""
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        run = f" flow run {flow_run.name}" if flow_run.id else ""
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}{run}"


@contextlib.contextmanager
def store_lease(store_url: str, what: str) -> Iterator[None]:
    """Hold the lease of the atlas at `store_url` while `what` writes into it (StoreLockedError if a
    live run holds it)."""
    with AtlasStore.open(store_url, "r+").lease(f"{lease_owner()} ({what})", ttl_s=LEASE_TTL_S):
        yield
