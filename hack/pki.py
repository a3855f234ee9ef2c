"""The local control plane's certificates and kubeconfigs (hack/cluster.py): one EC CA for the
cluster, a serving certificate for kube-apiserver, a client certificate per component and
for the admin, the ServiceAccount signing key, and Kueue's own CA as its certificate manager
wants it. Generated with openssl into .cache/cluster/pki, once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

PKI = Path(__file__).resolve().parent.parent / ".cache" / "cluster" / "pki"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def issue_cert(name: str, subject: str, sans: list[str] | None = None, ca: str = "ca") -> None:
    """An EC key and a certificate for `subject`, signed by the cluster CA (or `ca`)."""
    key, csr, crt = (PKI / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext = PKI / f"{name}.ext"
    usage = "serverAuth" if sans else "clientAuth"
    ext.write_text(
        f"keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        + (f"subjectAltName={','.join(sans)}\n" if sans else "")
    )
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(PKI / f"{ca}.crt"), "-CAkey",
        str(PKI / f"{ca}.key"), "-CAcreateserial", "-days", "3650", "-extfile", str(ext),
        "-out", str(crt),
    )
    csr.unlink()
    ext.unlink()


def make_pki() -> None:
    if (PKI / "done").exists():
        return
    PKI.mkdir(parents=True, exist_ok=True)
    openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(PKI / "ca.key"))
    openssl(
        "req", "-x509", "-new", "-key", str(PKI / "ca.key"), "-subj", "/CN=flywheel-local-ca",
        "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(PKI / "ca.crt"),
    )
    issue_cert(
        "apiserver", "/CN=kube-apiserver",
        ["IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes",
         "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
         "DNS:kubernetes.default.svc.cluster.local"],
    )
    issue_cert("admin", "/O=system:masters/CN=flywheel-admin")
    issue_cert("controller-manager", "/CN=system:kube-controller-manager")
    issue_cert("scheduler", "/CN=system:kube-scheduler")
    # kwok plays every kubelet: it updates node and pod status for all fake nodes.
    issue_cert("kwok", "/O=system:masters/CN=kwok")
    openssl("genrsa", "-out", str(PKI / "sa.key"), "2048")
    openssl("rsa", "-in", str(PKI / "sa.key"), "-pubout", "-out", str(PKI / "sa.pub"))
    (PKI / "done").touch()


def write_kubeconfig(path: Path, user: str, server: str) -> None:
    """A kubeconfig for `user` (its certificate and key) on the cluster at `server`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "flywheel-local", "cluster": {
            "server": server, "certificate-authority": str(PKI / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(PKI / f"{user}.crt"),
            "client-key": str(PKI / f"{user}.key")}}],
        "contexts": [{"name": "flywheel-local", "context": {
            "cluster": "flywheel-local", "user": user}}],
        "current-context": "flywheel-local",
    }
    path.write_text(json.dumps(config, indent=2))


def kueue_pki(service: str) -> None:
    """Kueue's CA and serving certificate, as its certificate manager accepts them (the CA
    valid for the name kueue-ca, the server for `service` and for 127.0.0.1, where the
    apiserver calls it), and its client certificate."""
    if (PKI / "kueue.crt").exists():
        return
    ca = PKI / "kueue-ca"
    openssl("genrsa", "-traditional", "-out", f"{ca}.key", "2048")  # it parses PKCS#1 RSA
    openssl(
        "req", "-x509", "-new", "-key", f"{ca}.key", "-subj", "/O=kueue/CN=kueue-ca",
        "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectAltName=DNS:kueue-ca", "-out", f"{ca}.crt",
    )
    issue_cert("kueue-webhook", f"/CN={service}", [f"DNS:{service}", "IP:127.0.0.1"],
               ca="kueue-ca")
    # Like kwok: the whole cluster is its business (Jobs, Pods, Workloads, Events, Secrets).
    issue_cert("kueue", "/O=system:masters/CN=kueue")
