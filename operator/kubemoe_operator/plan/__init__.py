"""From a spec to a layout: how many pods of which shape, each rank's experts, and every pod's command.

model.py        the plan: roles, pods, ranks, memory; what render/ and `kubemoe plan` read (pure data)
planner.py      spec + catalog -> plan, or a ManifestError naming the field and the fix
sizing.py       one rank's memory (weights, expert slots, KV), and the layouts suggested from it
redundant.py    spec.experts: redundant expert slots and vLLM's expert load balancing (EPLB)
command.py      the runtime's argv for one pod (both engines take the same flags)
host_sizing.py  CPU, memory and /dev/shm a serving pod needs besides its accelerators
experts.py      expert placement: hot experts replicated into redundant slots, packed over the EP ranks
"""
