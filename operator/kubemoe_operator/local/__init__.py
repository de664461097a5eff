"""`kubemoe up`: a ModelDeployment as processes on this machine, from the plan the operator uses.

    layout.py   Plan -> the processes (argv, ports, env) — each pod's own runtime command line, with pod
                addresses and ports mapped to 127.0.0.1 (pure)
    model.py    the model source: file:// or a plain path; the tiny example's checkpoint on first use
    runner.py   start, progress while loading, supervise, stop (process groups: nothing stray), state
    demo.py     `make demo`: up, one chat completion through the router with the OpenAI client, down

The operator never imports the runtime: processes run the `kubemoe-runtime` command.
"""
