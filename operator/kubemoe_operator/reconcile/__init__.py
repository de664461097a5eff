"""The reconcile loop: one ModelDeployment to its children and its status.

handlers.py       kopf's handlers and the periodic resync: when a reconcile runs
reconcile.py      parse -> plan -> render -> apply -> prune -> observe -> status, once
apply.py          server-side apply of the children, drift put back, names another object holds refused
observe.py        children as the cluster holds them -> per-role progress (pure)
status.py         the status and its conditions from what a reconcile learned (pure)
cluster_rules.py  what only the in-cluster operator refuses (specs no pod in a cluster could serve)
"""
