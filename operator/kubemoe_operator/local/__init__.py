"""`kubemoe up`: a ModelDeployment as processes on this machine, from the plan the operator uses.

    layout.py     Plan -> the processes (argv, ports, env) — each pod's own runtime command line, with pod
                  addresses and ports mapped to 127.0.0.1 (pure)
    devices.py    each pod's accelerators (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES), or the refusal
    model.py      the model source: file:// or a plain path; the tiny example's checkpoint on first use
    start.py      start every process of the plan, each in its own process group, and record them
    watch.py      readiness probes, progress while loading, the first process that exited, a log's tail
    processes.py  the run's processes in /proc: start times, boot id, process groups (no pid mistaken)
    stop.py       stop, process group by process group: nothing stray
    state.py      RUN_DIR/state.json, the start lock, the per-user index of runs (status/down from anywhere)
    status.py     `kubemoe status`: rows, table, JSON
    demo.py       `make demo`: up, one chat completion through the router with the OpenAI client, down

The operator never imports the runtime: processes run the `kubemoe-runtime` command.
"""
