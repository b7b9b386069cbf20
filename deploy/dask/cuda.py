"""One Dask worker per local GPU (dask-cuda), each advertising resources={"GPU": 1}; TLS on by
default (deploy/dask/tls.py: certificates made on first use, `--insecure` turns it off).

pip install dask-cuda
python deploy/dask/cuda.py [--port 8786] [--tls-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tls  # deploy/dask/tls.py, next to this file


def main() -> None:
    from dask_cuda import LocalCUDACluster

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8786)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept flows from other machines")
    tls.add_arguments(p)
    args = p.parse_args()
    security, protocol = tls.from_args(args, hosts=[args.host])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = len([d for d in visible.split(",") if d.strip()])
    else:
        import torch

        gpus = torch.cuda.device_count()
    cores_per_gpu = max(1, (os.cpu_count() or 1) // max(1, gpus))
    cluster = LocalCUDACluster(
        host=args.host,
        scheduler_port=args.port,
        threads_per_worker=1,  # one shard task at a time per GPU
        resources={"GPU": 1},
        env={"RFATLAS_TORCH_THREADS": str(cores_per_gpu), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        security=security,
        protocol=protocol,
    )
    print(cluster.scheduler_address, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
