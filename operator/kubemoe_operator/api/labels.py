"""The labels and annotations kubemoe puts on every child: what users, the router and the operator's
own watches select by. render/ sets them; kube/, reconcile/ and autoscale/ read them."""

from __future__ import annotations

LABEL_DEPLOYMENT = "kubemoe.io/deployment"
LABEL_ROLE = "kubemoe.io/role"
LABEL_GROUP = "kubemoe.io/group"
"""The serving-group set a pod belongs to (its workload); LWS adds the group index itself."""
LABEL_LEADER = "kubemoe.io/leader"
"""'true' on pods that serve the API (every Deployment pod, the leader of each LWS group)."""
LABEL_METRICS = "kubemoe.io/metrics"
"""'true' on pods that serve GET /metrics on port http: API pods, routers, and vLLM's headless pods (the
GPU series of their own GPUs); what the PodMonitor and the scrape annotations select."""
ANNOTATION_HASH = "kubemoe.io/applied-hash"
"""sha256 of the rendered object; a child whose hash matches is not applied again."""
MANAGED_BY = "kubemoe-operator"
ROUTER = "router"
