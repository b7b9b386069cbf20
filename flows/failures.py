"""The one failure policy of every flow: wait for all futures, then fail once, naming what failed.

Bad input (`RfatlasError`) is re-raised as is (the CLI: exit 2); anything else that failed (a crashed
worker, a bug, an I/O error that outlived its retries) becomes `TaskFailedError` (the CLI: exit 1),
which names the failing units. Finished units keep their results: a rerun resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rfcore.errors import RfatlasError


class TaskFailedError(Exception):
    """Tasks of a flow failed for a reason other than bad input (exit code 1)."""


def gather(futures: Sequence[Any], labels: Sequence[str], what: str) -> list[Any]:
    """Results of `futures` in order; after all have settled, raise per the policy above."""
    results: list[Any] = []
    bad: list[RfatlasError] = []
    failed: list[str] = []
    for label, future in zip(labels, futures, strict=True):
        try:
            results.append(future.result())
        except RfatlasError as e:
            bad.append(e)
        except Exception as e:
            failed.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if failed:
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise TaskFailedError(
            f"{len(failed)} of {len(futures)} {what} task(s) failed; rerun to resume (finished ones are kept): "
            + "; ".join(failed[:3])
            + more
        )
    if bad:
        raise bad[0]
    return results
