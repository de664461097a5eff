"""Act as a ServiceAccount: a kubeconfig carrying a token from the TokenRequest API.

Used to run the operator with exactly the permissions the Helm chart grants it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.handle import Cluster


def service_account_kubeconfig(
    cluster: Cluster, *, namespace: str, name: str, out: Path, duration: str = "2h"
) -> Path:
    """Write a kubeconfig for system:serviceaccount:NAMESPACE:NAME to out and return out."""
    token = cluster.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
    admin: dict[str, Any] = yaml.safe_load(cluster.kubeconfig.read_text())
    current = admin["current-context"]
    context = next(c["context"] for c in admin["contexts"] if c["name"] == current)
    server = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    base = cluster.kubeconfig.parent
    if "certificate-authority" in server and not Path(server["certificate-authority"]).is_absolute():
        server = {**server, "certificate-authority": str(base / server["certificate-authority"])}
    user = f"{namespace}:{name}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "target", "cluster": server}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "target", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


CHART = Path(__file__).resolve().parents[1] / "charts" / "kubemoe"


def install_operator_identity(cluster: Cluster, *, release: str, namespace: str, out: Path) -> Cluster:
    """`helm install` the chart, then return a handle that acts as its operator ServiceAccount:
    whatever runs with it has exactly the chart's RBAC (the operator's e2e runs this way)."""
    cluster.helm(
        "upgrade",
        "--install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--create-namespace",
        "--wait",
        "--timeout=5m",  # a loaded machine's control plane can be slow to report the objects ready
    )
    sa = cluster.kubectl(
        "get",
        "serviceaccount",
        "-n",
        namespace,
        "-l",
        f"app.kubernetes.io/instance={release}",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ).stdout.strip()
    kubeconfig = service_account_kubeconfig(cluster, namespace=namespace, name=sa, out=out)
    return Cluster(kubeconfig=kubeconfig, bin_dir=cluster.bin_dir, audit_log=cluster.audit_log)


def service_account_user(identity: Cluster) -> str:
    """The username the apiserver records for requests made with an identity's kubeconfig."""
    config = yaml.safe_load(identity.kubeconfig.read_text())
    namespace, name = config["current-context"].split(":", 1)
    return f"system:serviceaccount:{namespace}:{name}"
