"""The ``nanobot`` command: ``serve`` and ``outbox``. Errors become one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from nanobot import __version__
from nanobot.config import DEFAULT_CONFIG_PATH, Config, is_loopback_host, load_config, with_overrides
from nanobot.errors import ConfigError, NanobotError, StorageError

EXIT_CONFIG = 2  # a bad config, or an unusable workspace: fix it before trying again


def check_bind(config: Config) -> None:
    """Refuse to expose the API beyond this machine without an API key."""
    if not is_loopback_host(config.api.host) and not config.api.api_key:
        raise ConfigError(
            f"api.host: refusing to listen on {config.api.host} without api.apiKey; "
            "set api.apiKey (clients then send 'Authorization: Bearer <key>') or bind 127.0.0.1"
        )


_CONFIG_HELP = "config file (default: ~/.nanobot/config.json)"
SERVE_DESCRIPTION = (
    "Run the OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health) "
    "and the enabled chat channels until SIGINT or SIGTERM. Options override the config file."
)


def _with_config(parser: argparse.ArgumentParser, default: object = None) -> argparse.ArgumentParser:
    """Accept ``-c/--config`` on ``parser`` (so it may come before or after a subcommand)."""
    parser.add_argument("-c", "--config", default=default, help=_CONFIG_HELP)
    return parser


def _with_storage_url(parser: argparse.ArgumentParser, default: object = None) -> argparse.ArgumentParser:
    """Accept ``--storage-url`` on ``parser``, overriding the config's ``storage.url``."""
    parser.add_argument(
        "--storage-url", default=default, metavar="URL",
        help="sqlite, or postgresql://user:password@host/database (overrides storage.url; other local "
        "users can read a command line: prefer the config file for a password)",
    )  # fmt: skip
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanobot", description="nanobot: an AI agent behind an OpenAI API.")
    parser.add_argument("--version", action="version", version=f"nanobot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = _with_config(sub.add_parser("serve", help="run the gateway and the enabled channels",
                                        description=SERVE_DESCRIPTION))  # fmt: skip
    serve.add_argument("-H", "--host", help="address to bind (default from config: 127.0.0.1)")
    serve.add_argument("-p", "--port", type=int, help="port to bind (default from config: 8900)")
    serve.add_argument("-t", "--timeout", type=float, help="seconds per request (default from config: 120)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve.add_argument(
        "-w", "--workers", type=int, metavar="N",
        help="run N processes on one port (SO_REUSEPORT; needs storage.url = postgresql://...; "
        "default from config: api.workers, 1)",
    )  # fmt: skip
    _with_storage_url(serve)
    # Internal: how the --workers supervisor starts each worker (see workers.py).
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--workers-dir", help=argparse.SUPPRESS)
    outbox = _with_config(sub.add_parser(
        "outbox", help="show and act on the durable channel outbox",
        description="Look into the durable outbox of chat messages, and retry or drop one by hand. "
        "Works while nanobot serve runs: it is told at once.",
    ))  # fmt: skip
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    # SUPPRESS: an -c given before the action is not overwritten by the action's default.
    _with_storage_url(outbox)
    listing = _with_config(actions.add_parser("list", help="messages not yet delivered"), argparse.SUPPRESS)
    _with_storage_url(listing, argparse.SUPPRESS)
    listing.add_argument("--all", action="store_true", help="the delivered ones too")
    for name, what in (("retry", "make a message pending again, with fresh attempts"),
                       ("drop", "delete a message; it is never sent")):  # fmt: skip
        action = _with_storage_url(_with_config(actions.add_parser(name, help=what), argparse.SUPPRESS),
                                   argparse.SUPPRESS)  # fmt: skip
        action.add_argument("id", type=int, metavar="ID", help="the message's id, as `outbox list` shows")
    return parser


def _load(path: str | None) -> Config:
    config = load_config(path)
    for warning in config.warnings:
        print(f"nanobot: warning: {warning}", file=sys.stderr)
    return config


def _source(path: str | None) -> str:
    """Where the config comes from, for the start-up log: a path, or "" for the built-in defaults."""
    if path is not None:
        return str(Path(path).expanduser())
    default = DEFAULT_CONFIG_PATH.expanduser()
    return str(default) if default.exists() else ""


def _serve(args: argparse.Namespace) -> int:
    from nanobot.workers import check_workers

    config = with_overrides(
        _load(args.config),
        host=args.host,
        port=args.port,
        timeout=args.timeout,
        workers=args.workers,
        storage_url=args.storage_url,
    )
    check_bind(config)
    worker = args.worker_fd is not None
    if not worker:
        check_workers(config, flag=args.workers is not None)
    where = f"[worker {args.worker_index}] " if worker else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
    )
    if worker:
        return _run_worker(config, args)
    if config.api.workers > 1:
        return _supervise(config, args)
    from nanobot.runtime import install_uvloop, serve

    install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, source=_source(args.config)))
    return 0


def _run_worker(config: Config, args: argparse.Namespace) -> int:
    from nanobot.runtime import install_uvloop
    from nanobot.workers import run_worker

    install_uvloop()
    asyncio.run(run_worker(config, args.worker_fd, _source(args.config), args.workers_dir, args.worker_index))
    return 0


def _supervise(config: Config, args: argparse.Namespace) -> int:
    from nanobot.workers import Supervisor, check_port_free

    check_port_free(config.api.host, config.api.port)
    argv = ["serve", "-H", config.api.host, "-p", str(config.api.port), "-t", str(config.api.timeout)]
    if args.config is not None:
        argv += ["-c", str(Path(args.config).expanduser().resolve())]
    if args.verbose:
        argv.append("-v")
    if args.storage_url is not None:  # (already on our own command line: no new exposure)
        argv += ["--storage-url", args.storage_url]
    supervisor = Supervisor(argv, config.api.workers, config.api.shutdown_grace)
    try:
        return asyncio.run(supervisor.run())
    except KeyboardInterrupt:  # Ctrl-C before its handler was installed: nothing started yet
        return 130


def _outbox(args: argparse.Namespace) -> int:
    from nanobot.delivery.outbox_cli import outbox_command

    argv = [args.action] + (["--all"] if getattr(args, "all", False) else [])
    if args.action in ("retry", "drop"):
        argv.append(str(args.id))
    return outbox_command(with_overrides(_load(args.config), storage_url=args.storage_url), argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nanobot`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _outbox(args)
    except (ConfigError, StorageError) as exc:
        print(f"nanobot: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except NanobotError as exc:
        print(f"nanobot: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # not one we foresaw; still one line
        print(f"nanobot: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
