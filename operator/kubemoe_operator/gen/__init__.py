"""Files generated from the code, checked for drift by the tests; `make crds` writes them all.

crd.py             the CustomResourceDefinition, from the API models (api/)
rbac.py            the operator's RBAC rules, for the chart's ClusterRole
spec_reference.py  docs/spec-reference.md
chart_values.py    the chart's values.yaml and values.schema.json
"""
