"""The LeaderWorkerSet controller, run as a local process against the cluster.

Its webhooks (which label LWS pods and inject their environment) are served on
127.0.0.1 with a self-signed certificate; the webhook configurations point at that
URL with the CA bundle, so the apiserver can call them without in-cluster Services.
"""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.certs import make_serving_cert
from e2e.cluster.handle import Cluster
from e2e.cluster.procs import start_daemon
from kubemoe_runtime.pod.ports import free_port


def _lws_config(*, webhook_port: int, probe_port: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.lws.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
    }


def webhook_configurations(manifest_text: str, *, port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """Rewrite LWS's webhook manifests from in-cluster Services to a URL on 127.0.0.1."""
    ca_bundle = base64.b64encode(ca_pem).decode()
    docs = [d for d in yaml.safe_load_all(manifest_text) if d]
    for doc in docs:
        doc["metadata"]["name"] = "lws-" + doc["metadata"]["name"]
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
            hook["timeoutSeconds"] = 10
    return docs


def _wait_port(port: int, *, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"LWS webhook did not listen on 127.0.0.1:{port} in {timeout}s; see {log}")


def install_lws(cluster: Cluster, *, config_dir: Path, run_dir: Path, binary: Path) -> int:
    """Install the LWS CRDs, start its controller, register its webhooks. Returns the controller pid."""
    crds = sorted(config_dir.glob("crd-bases-*.yaml"))
    if not crds:
        raise RuntimeError(f"no LWS CRDs under {config_dir}; rebuild with `python -m e2e.cluster build`")
    for crd in crds:
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.wait_established(*(f"-f={c}" for c in crds))

    cert = make_serving_cert(run_dir / "lws-certs")
    webhook_port, probe_port = free_port(), free_port()
    cfg_file = run_dir / "lws-config.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            _lws_config(webhook_port=webhook_port, probe_port=probe_port, cert_dir=cert.cert_file.parent)
        )
    )
    log = run_dir / "lws-controller.log"
    pid = start_daemon(
        [str(binary), f"--config={cfg_file}", f"--kubeconfig={cluster.kubeconfig}", "--zap-log-level=info"],
        log=log,
        pidfile=run_dir / "lws-controller.pid",
    )
    _wait_port(webhook_port, timeout=60, log=log)
    hooks = webhook_configurations(
        (config_dir / "webhook-manifests.yaml").read_text(), port=webhook_port, ca_pem=cert.ca_pem
    )
    cluster.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(hooks))
    _wait_webhook_serving(cluster, timeout=60)
    return pid


_PROBE_LWS = """
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
metadata: {name: webhook-probe, namespace: default}
spec:
  replicas: 1
  leaderWorkerTemplate:
    size: 1
    workerTemplate:
      spec:
        containers: [{name: c, image: busybox}]
"""


def _wait_webhook_serving(cluster: Cluster, *, timeout: float) -> None:
    """A server-side dry run goes through the mutating and validating webhooks."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc = cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=_PROBE_LWS, check=False)
        if proc.returncode == 0:
            return
        last = proc.stderr
        time.sleep(1)
    raise RuntimeError(f"LWS webhooks not serving after {timeout}s: {last}")
