"""TLS for the Dask recipes: a private CA and one cluster certificate, so only holders of the
certificate can talk to the scheduler or the workers (mutual TLS: the scheduler runs any pickled
code its clients send, so an open `tcp://` port means remote code execution for anyone who can
reach it).

    python deploy/dask/tls.py --out ~/.config/rfatlas/dask-tls      # make ca.pem, cluster.pem, cluster-key.pem
    eval "$(python deploy/dask/tls.py --out ~/.config/rfatlas/dask-tls --env)"   # client side

Every recipe in deploy/dask/ turns TLS on by default with the certificates in `--tls-dir` (made on
first use); the flows (clients) find them through the Dask config environment variables that
`--env` prints (`DASK_DISTRIBUTED__COMM__TLS__*`), which `distributed.Security()` reads. Copy the
folder to every machine that runs flows or workers; keep cluster-key.pem secret (mode 0600).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(os.environ.get("RFATLAS_DASK_TLS_DIR", "~/.config/rfatlas/dask-tls")).expanduser()
CA, CERT, KEY = "ca.pem", "cluster.pem", "cluster-key.pem"


def make_certs(out: str | Path, hosts: list[str] | None = None, days: int = 825) -> Path:
    """Write a CA and a cluster certificate/key signed by it into `out` (kept if already there)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(out).expanduser()
    if all((folder / f).exists() for f in (CA, CERT, KEY)):
        return folder
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rfatlas dask CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for h in sorted({"localhost", "127.0.0.1", socket.gethostname(), *(hosts or [])}):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rfatlas dask cluster")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / CA).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / KEY
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return folder


def security(folder: str | Path = DEFAULT_DIR) -> Any:
    """`distributed.Security` for scheduler, workers and clients, encryption required."""
    from distributed import Security

    d = Path(folder).expanduser()
    ca, cert, key = str(d / CA), str(d / CERT), str(d / KEY)
    return Security(
        tls_ca_file=ca,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        tls_client_cert=cert,
        tls_client_key=key,
        require_encryption=True,
    )


def client_env(folder: str | Path = DEFAULT_DIR) -> dict[str, str]:
    """Dask config environment variables that make every client (the flows) and `dask worker`
    processes use these certificates (`distributed.Security()` reads them)."""
    d = Path(folder).expanduser().resolve()
    prefix = "DASK_DISTRIBUTED__COMM__"
    env = {f"{prefix}REQUIRE_ENCRYPTION": "True", f"{prefix}TLS__CA_FILE": str(d / CA)}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"{prefix}TLS__{role}__CERT"] = str(d / CERT)
        env[f"{prefix}TLS__{role}__KEY"] = str(d / KEY)
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`--tls-dir` and `--insecure` for the recipes."""
    p.add_argument("--tls-dir", default=str(DEFAULT_DIR), help="certificates (made on first use)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain tcp:// without TLS: anyone who reaches the port can run code on the cluster",
    )


def from_args(args: argparse.Namespace, hosts: list[str] | None = None) -> tuple[Any, str]:
    """(Security or None, protocol) of the recipe's arguments; prints how clients connect."""
    if args.insecure:
        print("WARNING: Dask without TLS: anyone who reaches the scheduler can run code on it", flush=True)
        return None, "tcp://"
    folder = make_certs(args.tls_dir, hosts)
    print(f"TLS on (certificates in {folder}); on the machines that run flows:", flush=True)
    for k, v in client_env(folder).items():
        print(f"  export {k}={v}", flush=True)
    return security(folder), "tls://"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_DIR))
    p.add_argument("--host", action="append", default=[], help="extra host name / IP for the certificate")
    p.add_argument("--env", action="store_true", help="print `export` lines for clients")
    args = p.parse_args()
    folder = make_certs(args.out, args.host)
    if args.env:
        for k, v in client_env(folder).items():
            print(f"export {k}={v}")
    else:
        print(folder)


if __name__ == "__main__":
    main()
