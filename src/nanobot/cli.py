"""The ``nanobot`` command: ``serve`` and ``outbox``. Errors become one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Sequence

from nanobot import __version__
from nanobot.config import Config, load_config, with_overrides
from nanobot.errors import ConfigError, NanobotError

EXIT_CONFIG = 2


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: Config) -> None:
    """Refuse to expose the API beyond this machine without an API key."""
    if not _is_loopback(config.api.host) and not config.api.api_key:
        raise ConfigError(
            f"api.host: refusing to listen on {config.api.host} without api.apiKey; "
            "set api.apiKey (clients then send 'Authorization: Bearer <key>') or bind 127.0.0.1"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanobot", description="nanobot: an AI agent behind an OpenAI API.")
    parser.add_argument("--version", action="version", version=f"nanobot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible gateway and the enabled channels")
    serve.add_argument("-c", "--config", help="config file (default: ~/.nanobot/config.json)")
    serve.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default from config: 8900)")
    serve.add_argument("--timeout", type=float, help="seconds per request (default from config: 120)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    outbox = sub.add_parser("outbox", help="show and act on the durable channel outbox")
    outbox.add_argument("-c", "--config", help="config file (default: ~/.nanobot/config.json)")
    outbox.add_argument("action", nargs=argparse.REMAINDER, help="list | retry ID | drop ID")
    return parser


def _load(path: str | None) -> Config:
    config = load_config(path)
    for warning in config.warnings:
        print(f"nanobot: warning: {warning}", file=sys.stderr)
    return config


def _serve(args: argparse.Namespace) -> int:
    from nanobot.runtime import install_uvloop, serve

    config = with_overrides(_load(args.config), host=args.host, port=args.port, timeout=args.timeout)
    check_bind(config)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_uvloop()
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(
            f"nanobot: cannot listen on {config.api.host}:{config.api.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _outbox(args: argparse.Namespace) -> int:
    try:
        from nanobot.channels.outbox_cli import outbox_command
    except ImportError:
        print("nanobot: the outbox is not available in this build", file=sys.stderr)
        return 1
    return outbox_command(_load(args.config), list(args.action))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nanobot`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _outbox(args)
    except ConfigError as exc:
        print(f"nanobot: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except NanobotError as exc:
        print(f"nanobot: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
