"""Expert rebalancing: gather each expert-parallel role's expert load from its group leaders, place the
experts anew (plan/experts.py), and apply the placement to the pods live and in a ConfigMap."""
