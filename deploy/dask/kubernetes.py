"""A Dask cluster on Kubernetes (dask-kubernetes operator): GPU workers from deploy/Dockerfile.gpu.

    pip install dask-kubernetes      # and install the Dask operator in the cluster once
    python deploy/dask/kubernetes.py --image ghcr.io/example/rfatlas-gpu:latest --workers 4

The scheduler service is `tls://rfatlas-dask-scheduler:8786` inside the namespace: the address the GPU
work pool gives flows (RFATLAS_DASK_ADDRESS in deploy/prefect.yaml). TLS is on by default: the
certificates of deploy/dask/tls.py go into the Secret `rfatlas-dask-tls` once,

    python deploy/dask/tls.py --out certs --host rfatlas-dask-scheduler --host rfatlas-dask-scheduler.rfatlas
    kubectl -n rfatlas create secret generic rfatlas-dask-tls --from-file=certs/

and are mounted at /etc/dask-tls in the scheduler, the workers and the flow pods (which also need the
`DASK_DISTRIBUTED__COMM__TLS__*` variables: `python deploy/dask/tls.py --out /etc/dask-tls --env`).
"""

from __future__ import annotations

import argparse
import time

TLS_DIR = "/etc/dask-tls"
_P = "DASK_DISTRIBUTED__COMM__"
TLS_ENV = {
    f"{_P}REQUIRE_ENCRYPTION": "True",
    f"{_P}TLS__CA_FILE": f"{TLS_DIR}/ca.pem",
    **{f"{_P}TLS__{r}__CERT": f"{TLS_DIR}/cluster.pem" for r in ("SCHEDULER", "WORKER", "CLIENT")},
    **{f"{_P}TLS__{r}__KEY": f"{TLS_DIR}/cluster-key.pem" for r in ("SCHEDULER", "WORKER", "CLIENT")},
}


def _with_tls(pod: dict, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
    """Mount the Secret rfatlas-dask-tls at TLS_DIR and point Dask's TLS config at it."""
    pod.setdefault("volumes", []).append({"name": "dask-tls", "secret": {"secretName": "rfatlas-dask-tls"}})
    container = pod["containers"][0]
    container.setdefault("volumeMounts", []).append(
        {"name": "dask-tls", "mountPath": TLS_DIR, "readOnly": True}
    )
    container.setdefault("env", []).extend(
        {"name": k, "value": v} for k, v in {**TLS_ENV, **(env or {})}.items()
    )
    if args:
        container["args"] = [*container.get("args", []), *args]


def main() -> None:
    from dask_kubernetes.operator import KubeCluster, make_cluster_spec

    p = argparse.ArgumentParser()
    p.add_argument("--image", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--namespace", default="rfatlas")
    p.add_argument(
        "--insecure", action="store_true", help="plain tcp:// (anyone in the cluster can run code)"
    )
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
    if not args.insecure:  # mutual TLS between scheduler, workers and flows
        _with_tls(spec["spec"]["scheduler"]["spec"], args=["--protocol", "tls"])
        address = f"tls://rfatlas-dask-scheduler.{args.namespace}.svc.cluster.local:8786"
        _with_tls(spec["spec"]["worker"]["spec"], env={"DASK_SCHEDULER_ADDRESS": address})
    cluster = KubeCluster(custom_cluster_spec=spec, namespace=args.namespace, shutdown_on_close=True)
    print(cluster.scheduler_address, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
