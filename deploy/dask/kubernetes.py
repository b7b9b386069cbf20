"""A Dask cluster on Kubernetes (dask-kubernetes operator): GPU workers from deploy/Dockerfile.gpu.

    pip install dask-kubernetes      # and install the Dask operator in the cluster once
    python deploy/dask/kubernetes.py --image ghcr.io/example/rfatlas-gpu:latest --workers 4

The scheduler service is `rfatlas-dask-scheduler:8786` inside the namespace: the address the GPU work
pool gives flows (RFATLAS_DASK_ADDRESS in deploy/prefect.yaml).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from dask_kubernetes.operator import KubeCluster, make_cluster_spec

    p = argparse.ArgumentParser()
    p.add_argument("--image", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--namespace", default="rfatlas")
    args = p.parse_args()
    spec = make_cluster_spec(
        name="rfatlas-dask",
        image=args.image,
        n_workers=args.workers,
        resources={
            "limits": {"nvidia.com/gpu": "1", "memory": "16Gi"},
            "requests": {"cpu": "4", "memory": "16Gi"},
        },
        env={"RFATLAS_TORCH_THREADS": "4", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    worker["args"] = [*worker.get("args", []), "--nthreads", "1", "--resources", "GPU=1"]
    # S3 keys from a Kubernetes Secret, never from the spec itself.
    worker.setdefault("envFrom", []).append({"secretRef": {"name": "rfatlas-s3", "optional": True}})
    cluster = KubeCluster(custom_cluster_spec=spec, namespace=args.namespace, shutdown_on_close=True)
    print(cluster.scheduler_address, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
