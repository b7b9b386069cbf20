"""What a run leaves behind for monitoring: the Prefect UI URL of the flow run that made an atlas,
recorded in the store's root attrs (`prefect_flow_run_url`, read by the site's pages)."""

from __future__ import annotations

from typing import Any

from rfcore.site import FLOW_RUN_ATTR


def flow_run_ui_url() -> str | None:
    """The UI URL of the current flow run (None outside one, or without a UI URL)."""
    from prefect.runtime import flow_run

    url = flow_run.ui_url
    return str(url) if url and not str(url).startswith("None") else None


def record_flow_run(store: Any) -> str | None:
    """Write the current flow run's UI URL into `store`'s root attrs (call it from one writer, e.g.
    the flow while it holds the lease); returns it. A later run on the same store replaces it."""
    url = flow_run_ui_url()
    if url:
        store.root.attrs.update({FLOW_RUN_ATTR: url})
    return url
