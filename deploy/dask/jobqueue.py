"""A Dask cluster of Slurm jobs (dask-jobqueue), one GPU per worker job.

    pip install dask-jobqueue
    python deploy/dask/jobqueue.py --queue gpu --jobs 4 --account myproj

Swap SLURMCluster for PBSCluster / SGECluster / LSFCluster as your site needs. TLS is on by default
(deploy/dask/tls.py; `--tls-dir` must be on a file system the jobs see; `--insecure` turns it off).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tls  # deploy/dask/tls.py, next to this file


def main() -> None:
    from dask_jobqueue import SLURMCluster

    p = argparse.ArgumentParser()
    p.add_argument("--queue", default="gpu")
    p.add_argument("--account", default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cores", type=int, default=8)
    p.add_argument("--memory", default="32GB")
    p.add_argument("--walltime", default="04:00:00")
    tls.add_arguments(p)
    args = p.parse_args()
    security, protocol = tls.from_args(args)
    cluster = SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        processes=1,  # one worker per job, one GPU per worker
        memory=args.memory,
        walltime=args.walltime,
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--nthreads", "1", "--resources", "GPU=1"],
        job_script_prologue=[
            f"export RFATLAS_TORCH_THREADS={args.cores}",
            "export PREFECT_SERVER_ANALYTICS_ENABLED=false",
        ],
        scheduler_options={"port": 8786},
        security=security,
        protocol=protocol,
    )
    cluster.scale(jobs=args.jobs)
    print(cluster.scheduler_address, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
