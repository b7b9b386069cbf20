"""The Dask recipes' TLS (deploy/dask/tls.py): a cluster started with its certificates accepts a
client that has them and refuses plain tcp:// and clients without them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tls() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rfatlas_deploy_tls", REPO / "deploy" / "dask" / "tls.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tls_cluster_accepts_certified_clients_only(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster, Security

    tls = _tls()
    folder = tls.make_certs(tmp_path / "certs")
    assert oct((folder / "cluster-key.pem").stat().st_mode & 0o777) == "0o600"
    env = tls.client_env(folder)
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    sec = tls.security(folder)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tls://",
        security=sec,
        dashboard_address=None,
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with Client(address, security=sec, timeout=20) as client:
            assert client.submit(lambda x: x + 1, 1).result(timeout=20) == 2
        with pytest.raises(OSError):  # plain TCP to a TLS listener: CommClosedError
            Client(address.replace("tls://", "tcp://"), timeout=3)
        other = tls.make_certs(tmp_path / "other")  # another CA: refused in the handshake
        stranger = Security(
            tls_ca_file=str(other / "ca.pem"),
            tls_client_cert=str(other / "cluster.pem"),
            tls_client_key=str(other / "cluster-key.pem"),
            require_encryption=True,
        )
        with pytest.raises(OSError, match="TLS certificate does not match"):
            Client(address, security=stranger, timeout=3)


def test_recipes_default_to_tls() -> None:
    for name in ("cuda.py", "jobqueue.py", "kubernetes.py"):
        text = (REPO / "deploy" / "dask" / name).read_text()
        assert "--insecure" in text and ("tls.from_args" in text or "_with_tls" in text), name
    yaml_text = (REPO / "deploy" / "dask" / "kubernetes-cluster.yaml").read_text()
    assert "--protocol, tls" in yaml_text and "REQUIRE_ENCRYPTION" in yaml_text
