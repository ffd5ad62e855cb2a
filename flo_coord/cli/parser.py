"""The argparse definition of every subcommand (no heavy imports: ``--help`` stays fast)."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from flo_coord import __version__

DESCRIPTION = """\
flo-coord keeps streaming LLM answers alive across backend failures and worker crashes.
Each request's state lives in Redis, so any worker replica can take a request over and
any client can follow the answer from any replica.

Configuration, highest first: flags > FLO_* environment variables > the TOML file
(--config or FLO_CONFIG) > defaults. See docs/CLI.md for the table."""

EPILOG = """\
start here:
  flo-coord demo                     3 gateways, a fake LLM, one SIGKILLed mid-answer
  flo-coord worker --backend Vllm=http://localhost:8000,my-model
  flo-coord submit "Why is the sky blue?"
"""


class Parser(argparse.ArgumentParser):
    """Errors are one line (plus where to look) and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _number(cast: Any, what: str, minimum: float, exclusive: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum or (exclusive and value == minimum) or value != value or value == float("inf"):
            bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} {bound}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


seconds = _number(float, "a number of seconds", 0, exclusive=True)
seconds0 = _number(float, "a number of seconds", 0)
count = _number(int, "a whole number", 1)
offset = _number(int, "a character offset", 0)


def fraction(text: str) -> float:
    value = float(_number(float, "a fraction", 0, exclusive=True)(text))
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def history_count(text: str) -> int:
    """``history -n``: 1 to HISTORY_MAXLEN, the entries the history stream keeps (more cannot exist)."""
    from flo_coord.defaults import HISTORY_MAXLEN

    value = int(count(text))
    if value > HISTORY_MAXLEN:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {HISTORY_MAXLEN}: the history keeps only the newest {HISTORY_MAXLEN} entries"
        )
    return value


def port(text: str) -> int:
    value = _number(int, "a TCP port", 0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(value)


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    redis = argparse.ArgumentParser(add_help=False)
    group = redis.add_argument_group("where (flags > FLO_* environment > TOML file > defaults)")
    group.add_argument("--config", metavar="FILE", help="TOML settings file (env FLO_CONFIG)")
    group.add_argument(
        "--redis-url", metavar="URL", help="Redis URL (env FLO_REDIS_URL; default redis://localhost:6379/0)"
    )
    group.add_argument(
        "--namespace", metavar="NS", help="key prefix; isolates deployments (env FLO_NAMESPACE; default flo)"
    )
    logs = argparse.ArgumentParser(add_help=False)
    group = logs.add_argument_group("logging")
    group.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error (env FLO_LOG_LEVEL)")
    group.add_argument(
        "--log-format", choices=("kv", "json"), help="key=value or JSON lines (env FLO_LOG_FORMAT; default kv)"
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return redis, logs, output


def _backend_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--backend",
        action="append",
        metavar="NAME=URL,MODEL[,KIND[,PROVIDER]]",
        help=f"{what} (repeatable, each NAME once; tried in the order given, deployments of one provider "
        "load-balanced; KIND openai (default), ollama or anthropic; PROVIDER a ServingBackend, needed when "
        "NAME is not one; replaces the TOML file's [[backends]])",
    )


def _serve_command(command: Any, redis: argparse.ArgumentParser, logs: argparse.ArgumentParser) -> None:
    p = command(
        "serve",
        "flo_coord.cli.gateway:cmd_serve",
        "Run an OpenAI-compatible HTTP gateway that is also a worker; streams resume on any replica",
        (redis, logs),
    )
    p.description = (
        "Run an OpenAI-compatible HTTP gateway that is also a worker for the requests it receives over HTTP "
        "(and for orphans it takes over); streams resume on any replica. It does not take requests from the "
        "Redis queue that 'flo-coord submit' writes to: run 'flo-coord worker' for those (docs/GATEWAY.md)"
    )
    p.add_argument("--host", metavar="ADDR", help="address to listen on (env FLO_GATEWAY_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=port, metavar="PORT", help="port, 0 for any (env FLO_GATEWAY_PORT; default 8080)")
    p.add_argument(
        "--worker-id", metavar="ID", help="unique id of this replica (env FLO_WORKER_ID; default <host>-<pid>-<random>)"
    )
    p.add_argument("--lease-ttl", type=seconds, metavar="S", help="lease in seconds (env FLO_LEASE_TTL; default 5)")
    _backend_flag(p, "a backend to generate with")
    p.add_argument("--key-env", action="append", metavar="VAR", help="require a bearer key; VAR holds one (repeatable)")
    p.add_argument("--on-disconnect", choices=("keep", "cancel"), help="when a client leaves (default keep)")
    p.add_argument("--disconnect-grace", type=seconds0, metavar="S", help="with cancel: time to come back (10)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow this CORS origin (repeatable)")
    p.add_argument("--reap-interval", type=seconds, metavar="S", help="reaper period (default: from the lease)")
    p.add_argument("--grace", type=seconds0, default=10.0, metavar="S", help="on SIGTERM, time for open streams (10)")
    p.add_argument("--exit-with-parent", action="store_true", help="drain and stop when the parent process exits")


def build_parser() -> Parser:
    parser = Parser(
        prog="flo-coord",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flo-coord {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    redis, logs, output = _parents()

    def command(name: str, handler: str, help_text: str, parents: tuple[Any, ...] = ()) -> Parser:
        p: Parser = sub.add_parser(name, help=help_text, description=help_text, parents=list(parents))
        p.set_defaults(handler=handler)
        return p

    p = command(
        "demo",
        "flo_coord.cli.demo:cmd_demo",
        "Run 3 gateway replicas on a fake LLM, SIGKILL the busiest mid-answer, resume its HTTP streams "
        "elsewhere, verify every answer byte for byte",
        (logs,),
    )
    p.add_argument("--requests", type=count, default=20, metavar="N", help="HTTP streaming clients (default 20)")
    p.add_argument("--replicas", type=count, default=3, metavar="N", help="flo-coord serve processes (default 3)")
    p.add_argument("--redis-url", metavar="URL", help="use this Redis (own namespace) instead of an embedded one")
    p.add_argument("--namespace", metavar="NS", help="key prefix (default: demo-<random>)")
    p.add_argument("--lease-ttl", type=seconds, default=1.5, metavar="S", help="worker lease in seconds (default 1.5)")
    p.add_argument("--token-delay", type=seconds0, default=0.2, metavar="S", help="seconds between tokens (0.2)")
    p.add_argument("--tokens", type=count, default=64, metavar="N", help="tokens per answer (default 64)")
    p.add_argument("--kill-at", type=fraction, default=0.35, metavar="F", help="kill when answers are F done (0.35)")
    p.add_argument("--no-kill", action="store_true", help="do not kill a worker")
    p.add_argument(
        "--backend-fault",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also cut some of one backend's streams mid-answer (default on)",
    )
    p.add_argument("--plain", action="store_true", help="line output even on a terminal")
    p.add_argument("--timeout", type=seconds, default=120.0, metavar="S", help="give up after S seconds (120)")
    p.add_argument("--summary-json", metavar="FILE", help="also write the summary (and child pids) as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the replicas' log directory")

    p = command(
        "worker",
        "flo_coord.cli.serve:cmd_worker",
        "Run a worker: take submitted requests, stream them with failover, take over orphans",
        (redis, logs),
    )
    p.add_argument(
        "--worker-id", metavar="ID", help="unique id of this replica (env FLO_WORKER_ID; default <host>-<pid>-<random>)"
    )
    p.add_argument("--lease-ttl", type=seconds, metavar="S", help="lease in seconds (env FLO_LEASE_TTL; default 5)")
    p.add_argument("--concurrency", type=count, metavar="N", help="requests run at once (env FLO_CONCURRENCY; 64)")
    p.add_argument("--grace", type=seconds0, default=10.0, metavar="S", help="on SIGTERM, time to finish (10)")
    _backend_flag(p, "a backend to generate with")
    p.add_argument("--metrics-port", type=port, metavar="PORT", help="serve Prometheus /metrics (env FLO_METRICS_PORT)")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR", help="address for /metrics (127.0.0.1)")
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process exits")

    _serve_command(command, redis, logs)

    p = command(
        "submit",
        "flo_coord.cli.client:cmd_submit",
        "Queue a request (a prompt or chat messages) for the workers and print its answer as it streams",
        (redis, logs),
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file, or stdin with '-')")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument(
        "--message",
        action="append",
        metavar="ROLE=TEXT",
        help="a chat message instead of a prompt (repeatable, in order; ROLE system, developer, user or assistant)",
    )
    p.add_argument(
        "--messages-file",
        metavar="FILE",
        help='chat messages from a JSON file: [{"role": ..., "content": ...}, ...] or {"messages": [...]}',
    )
    p.add_argument("--request-id", metavar="ID", help="request id (default: a random one)")
    p.add_argument(
        "--primary", metavar="BACKEND", help="backend (deployment or ServingBackend) to try first (e.g. Vllm)"
    )
    p.add_argument(
        "--model",
        metavar="GROUP",
        help="a model group to run it through ([[models]] of the workers' config; without any, a backend's model)",
    )
    p.add_argument("--max-tokens", type=count, metavar="N", help="answer length limit")
    p.add_argument("--no-follow", action="store_true", help="print the request id and return at once")
    p.add_argument("--wait", type=seconds, default=30.0, metavar="S", help="time for a worker to take it (30)")
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="S", help="give up following after S (600)")

    p = command(
        "follow",
        "flo_coord.cli.client:cmd_follow",
        "Print a request's answer from an offset, live, until it ends (from any replica)",
        (redis, logs),
    )
    p.add_argument("request_id", metavar="REQUEST_ID", help="the request (its id, as submit prints it)")
    p.add_argument("--offset", type=offset, default=0, metavar="N", help="start at character N (default 0)")
    p.add_argument("--wait", type=seconds0, default=0.0, metavar="S", help="wait S for the request to appear")
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="S", help="give up after S (600)")

    p = command(
        "inspect",
        "flo_coord.cli.client:cmd_inspect",
        "Show one request: its live context or its outcome",
        (redis, logs, output),
    )
    p.add_argument("request_id", metavar="REQUEST_ID", help="the request (its id, as submit prints it)")
    p.add_argument("--full", action="store_true", help="do not shorten the prompt and answer")

    command(
        "stats",
        "flo_coord.cli.client:cmd_stats",
        "Attempt and takeover counts over recent history",
        (redis, logs, output),
    )

    p = command(
        "history",
        "flo_coord.cli.client:cmd_history",
        "Recent attempts and takeovers, oldest first",
        (redis, logs, output),
    )
    p.add_argument(
        "-n", "--count", type=history_count, default=20, metavar="N", help="entries to show (default 20, max 100)"
    )
    p.add_argument("--request-id", metavar="ID", help="only this request's entries")

    p = command(
        "top",
        "flo_coord.cli.ops:cmd_top",
        "Live table of active requests: owner, epoch, lease, backend",
        (redis, logs, output),
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=seconds, default=1.0, metavar="S", help="refresh every S (default 1)")
    p.add_argument("--limit", type=count, default=50, metavar="N", help="rows at most (default 50)")

    p = command(
        "reap",
        "flo_coord.cli.ops:cmd_reap",
        "One reaper pass: list orphaned requests; claim them (--claim), and resume them when backends are set",
        (redis, logs, output),
    )
    p.add_argument("--claim", action="store_true", help="claim the orphans (implied when backends are configured)")
    p.add_argument("--worker-id", metavar="ID", help="owner id for claims (default reaper-<host>-<pid>)")
    p.add_argument("--lease-ttl", type=seconds, metavar="S", help="lease of claimed requests (env FLO_LEASE_TTL)")
    p.add_argument("--limit", type=count, default=100, metavar="N", help="orphans at most (default 100)")
    _backend_flag(p, "a backend to resume claimed requests on")

    p = command(
        "install-functions",
        "flo_coord.cli.admin:cmd_install_functions",
        "Load the Redis Functions library workers FCALL (an operator step, admin credential; every Cluster primary)",
        (redis, output),
    )
    p.add_argument("--prune", action="store_true", help="also delete flo_coord libraries of other versions")

    p = command(
        "serve-fake-llm",
        "flo_coord.cli.serve:cmd_fake_llm",
        "Run the deterministic fake LLM server (OpenAI and Ollama APIs, injectable faults)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8001, help="port (default 8001)")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="MODEL=SPEC",
        help="inject a fault: e.g. m=cut:5 (MODEL may be *; repeatable; SPECs in docs/CLI.md)",
    )
    p.add_argument("--token-delay", type=seconds0, default=0.0, metavar="S", help="seconds between tokens")
    p.add_argument("--model-delay", action="append", default=[], metavar="MODEL=S", help="per-model token delay")
    p.add_argument("--tokens", type=count, default=48, metavar="N", help="answer length in tokens (48)")

    p = command(
        "import-litellm",
        "flo_coord.cli.imports:cmd_import_litellm",
        "Print the flo_coord TOML equivalent of a LiteLLM config.yaml; untranslated keys go to stderr",
    )
    p.add_argument("config_yaml", metavar="CONFIG_YAML", help="the LiteLLM proxy config (model_list, router_settings)")

    p = command(
        "bench",
        "flo_coord.cli.serve:cmd_bench",
        "Run scripts/bench.py; every argument after 'bench' goes to it ('bench -- --help' for its help)",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for scripts/bench.py")
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``parser`` itself for None or an unknown name)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]  # type: ignore[no-any-return]
    return parser
