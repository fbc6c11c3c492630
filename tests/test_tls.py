"""etcd over TLS with client certificates: a real etcd started with TLS, real certificates."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import replace

import pytest

from inferq.runtime.coordination import ETCD_ERRORS, open_etcd
from inferq.runtime.membership import MembershipLease
from inferq.runtime.records import WorkerRecord
from tests.conftest import free_port
from tests.support import wait_until


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed, so no certificates can be made")
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=inferq-test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(d / "san.cnf"), "-out", str(d / f"{name}.pem"))
    return d


@pytest.fixture
async def tls_etcd(certificates, tmp_path):
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.skip("etcd is not installed")
    port, peer = free_port(), free_port()
    c = certificates
    proc = subprocess.Popen(
        [etcd, "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", f"https://127.0.0.1:{port}", "--advertise-client-urls", f"https://127.0.0.1:{port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
         "--cert-file", str(c / "server.pem"), "--key-file", str(c / "server.key"),
         "--client-cert-auth", "--trusted-ca-file", str(c / "ca.pem")],
        stdout=open(tmp_path / "etcd.log", "wb"), stderr=subprocess.STDOUT,
    )
    yield port
    proc.terminate()
    proc.wait(10)


async def test_membership_works_against_etcd_with_tls_and_client_certificates(synced, certificates, tls_etcd) -> None:
    c = certificates
    settings = replace(synced.etcd, port=tls_etcd, ca_file=str(c / "ca.pem"), cert_file=str(c / "client.pem"), key_file=str(c / "client.key"))

    async def answers() -> bool:
        try:
            async with open_etcd(settings) as client:
                await asyncio.wait_for(client.put(b"/tls/probe", b"1"), 2)
                return True
        except ETCD_ERRORS:  # still starting
            return False

    await wait_until(answers, 30, "etcd with TLS to answer", interval=0.3)
    async with open_etcd(settings) as client:
        lease = await MembershipLease.open(client, "/tls/workers/w1", WorkerRecord("w1", "mlp", "1"), ttl_s=5)
        assert (await client.get(b"/tls/workers/w1")) is not None
        await lease.aclose()
        assert (await client.get(b"/tls/workers/w1")) is None
    no_cert = replace(settings, cert_file="", key_file="")
    with pytest.raises(ETCD_ERRORS):  # without a client certificate etcd refuses the TLS handshake
        async with open_etcd(no_cert) as client:
            await asyncio.wait_for(client.put(b"/tls/probe", b"2"), 3)
