"""One Dask worker per local GPU (dask-cuda), each advertising resources={"GPU": 1}.

pip install dask-cuda
python deploy/dask/cuda.py [--port 8786]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    from dask_cuda import LocalCUDACluster

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8786)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept flows from other machines")
    args = p.parse_args()
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
    )
    print(cluster.scheduler_address, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
