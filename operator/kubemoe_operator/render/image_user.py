"""The user the kubemoe images run as, and the writable paths they give it.

operator/Dockerfile, runtime/Dockerfile and runtime/Dockerfile.cpu each create this user
(`useradd --uid IMAGE_UID`, `USER IMAGE_UID:IMAGE_UID`); the renderer runs every serving and
router pod as it, and the Helm chart runs the operator as it. tests/test_images.py fails when a
Dockerfile or the chart says otherwise: a pod running as another uid could not write the
image's HOME or Hugging Face cache.
"""

from __future__ import annotations

IMAGE_UID = 65532
"""uid and gid of the images' user."""
IMAGE_USER = "kubemoe"
RUNTIME_HOME = f"/home/{IMAGE_USER}"
"""The runtime images' HOME (`useradd --create-home`): vLLM, torch and triton write caches under it."""
CACHE_DIR = "/cache"
"""Mount point of the model cache (a claim, or a pod-lifetime emptyDir)."""
HF_HOME = f"{CACHE_DIR}/huggingface"
"""The runtime images' HF_HOME: where hf:// weights are downloaded."""
