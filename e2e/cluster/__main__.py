"""`python -m e2e.cluster build|up|env|down|status` — a local Kubernetes control plane for kubemoe."""

from __future__ import annotations

import argparse
import shlex
import sys

from e2e.cluster import build, kwok, lifecycle, realnode_build
from e2e.cluster.nodes import GpuNodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("--name", default="kubemoe", help="cluster name (default: kubemoe)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the control-plane binaries (cached behind a stamp)")
    b.add_argument("--real-nodes", action="store_true", help="and the real node's (kubelet, containerd, ...)")
    up = sub.add_parser("up", help="start the cluster: kwok GPU nodes + LeaderWorkerSet")
    defaults = GpuNodes()
    up.add_argument("--nodes", type=int, default=defaults.count)
    up.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    up.add_argument("--gpu-product", default=defaults.gpu_product)
    up.add_argument("--gpu-memory", type=int, default=defaults.gpu_memory_mib, help="MiB per GPU")
    up.add_argument("--no-lws", action="store_true", help="skip the LeaderWorkerSet controller")
    up.add_argument(
        "--real-nodes",
        type=int,
        default=0,
        help="real nodes (kubelet + containerd, running containers) beside the kwok ones (default 0)",
    )
    sub.add_parser("env", help="print `export KUBECONFIG=...` for the running cluster")
    sub.add_parser("down", help="stop everything the cluster started")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        print(build.ensure_built().bin)
        if args.real_nodes:
            print(realnode_build.ensure_built().bin)
        return 0
    if args.cmd == "up":
        nodes = GpuNodes(
            count=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_product=args.gpu_product,
            gpu_memory_mib=args.gpu_memory,
        )
        config = kwok.ClusterConfig(
            name=args.name, nodes=nodes, with_lws=not args.no_lws, real_nodes=args.real_nodes
        )
        cluster = lifecycle.up(config)
        print(f"kubeconfig: {cluster.kubeconfig}")
        print('run: eval "$(python -m e2e.cluster env)"   # then kubectl get nodes')
        return 0
    if args.cmd == "env":
        existing = kwok.existing(args.name)
        if existing is None:
            print(
                f"no cluster named {args.name!r} is up; start one with `python -m e2e.cluster up`",
                file=sys.stderr,
            )
            return 1
        print(f"export KUBECONFIG={shlex.quote(str(existing.kubeconfig))}")
        print(f'export PATH={shlex.quote(str(existing.bin_dir))}:"$PATH"')
        return 0
    problems = lifecycle.down(args.name)
    if problems:
        print(f"cluster {args.name!r} is down, but these host changes could not be undone:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"cluster {args.name!r} is down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
