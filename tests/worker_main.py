"""A worker process for the multi-process tests: a Coordinator on the fake LLM server, run by ``Worker``.

    python tests/worker_main.py --redis URL --namespace NS --worker-id ID --base-url URL [--lease-ttl S] ...

Backends: Vllm (model ``vllm-m``) then Together (model ``together-m``), both on ``--base-url``.
Prints ``ready <worker id>`` on stdout once heartbeats and the reaper run; logs go to stderr.
SIGTERM/SIGINT stop it gracefully (in-flight requests are handed back after ``--grace`` s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from flo_coord import FailoverConfig, ServingBackend
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.coordinator import Coordinator, ExecutorConfig
from flo_coord.execution.worker import Worker


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--reap-interval", type=float, default=None)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--block", type=float, default=0.2)
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    specs = [
        BackendSpec(name="Vllm", base_url=args.base_url, model="vllm-m"),
        BackendSpec(name="Together", base_url=args.base_url, model="together-m"),
    ]
    coordinator = Coordinator(
        specs,
        url=args.redis,
        config=FailoverConfig(fallback_order=[ServingBackend.Vllm, ServingBackend.Together]),
        namespace=args.namespace,
        worker_id=args.worker_id,
        lease_ttl=args.lease_ttl,
        executor=ExecutorConfig(first_token_timeout=5.0, stall_timeout=5.0),
    )
    worker = Worker(coordinator, grace=args.grace, block=args.block)
    worker.install_signal_handlers()
    await coordinator.start(reap_interval=args.reap_interval)  # Worker.run's own start() is then a no-op
    print(f"ready {args.worker_id}", flush=True)
    await worker.run()


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {arguments.worker_id} %(name)s %(message)s"
    )
    asyncio.run(main(arguments))
