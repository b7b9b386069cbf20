"""`prefect deploy`, with a workaround for one client/server mismatch of this project's pinned stack.

    python deploy/prefect_deploy.py --prefect-file deploy/prefect.yaml --all
    python deploy/prefect_deploy.py --prefect-file deploy/prefect.yaml --name atlas

Takes exactly the arguments of `prefect deploy` (run it from the repository root) and always runs
non-interactively (`prefect --no-prompt deploy ...`).

Why: after creating each deployment, `prefect deploy` (prefect 3.8.8) asks the server for the pool's
online workers with `{"offset": null, "limit": null}`; a self-hosted `prefect server` running under
fastapi 0.154 (this project's pin; never upgrade it) rejects the explicit nulls with HTTP 422
("Input should be a valid integer"), so `prefect deploy` exits 1 after the *first* deployment and
`--all` never reaches the others. This wrapper fills in `offset=0` and a finite `limit` for that one
call and otherwise is the stock CLI. Where `prefect deploy` works (Prefect Cloud, a server without the
mismatch) use `prefect --no-prompt deploy ...` directly: the yaml is the same.
"""

from __future__ import annotations

import sys
from typing import Any


def _patch_read_workers() -> None:
    from prefect.client.orchestration import PrefectClient

    original = PrefectClient.read_workers_for_work_pool
    if getattr(original, "_rfatlas_patched", False):
        return

    async def read_workers_for_work_pool(
        self: Any,
        work_pool_name: str,
        worker_filter: Any = None,
        offset: int | None = None,
        limit: int | None = None,
    ) -> Any:
        return await original(
            self,
            work_pool_name,
            worker_filter=worker_filter,
            offset=0 if offset is None else offset,
            limit=200 if limit is None else limit,
        )

    read_workers_for_work_pool._rfatlas_patched = True  # type: ignore[attr-defined]
    PrefectClient.read_workers_for_work_pool = read_workers_for_work_pool  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _patch_read_workers()
    from prefect.cli import app

    sys.argv = ["prefect", "--no-prompt", "deploy", *args]
    try:
        result = app()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
