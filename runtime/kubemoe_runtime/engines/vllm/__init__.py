"""`serve --engine vllm`: vLLM on a loopback port behind a thin kubemoe front on the pod's port.

command.py    the vLLM argv built from serve's flags (vLLM's names, so mostly a copy)
supervise.py  launch vLLM, forward SIGTERM, exit when it exits (Kubernetes restarts the pod)
front.py      the pod's port: /health, /ready, /metrics, and every other path proxied to vLLM
metrics.py    vLLM's own series passed through, plus the autoscaler's kubemoe_* series derived
              from them with the deployment/role/group/rank labels the torch engine exports
"""

from kubemoe_runtime.engines.vllm.command import vllm_command, vllm_python
from kubemoe_runtime.engines.vllm.supervise import serve_vllm

__all__ = ["serve_vllm", "vllm_command", "vllm_python"]
