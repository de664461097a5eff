"""The Kubernetes API as the operator uses it.

client.py   reads, server-side apply, create-once, events (`Kube`), errors classified for retry
kinds.py    the kinds of children a ModelDeployment owns, and the lightkube classes that reach them
leader.py   leader election on a coordination.k8s.io Lease: only the holder reconciles
"""
