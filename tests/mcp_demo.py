"""A real MCP server for the tests, written with the official SDK (``MCPServer``, v1's FastMCP).

Run it as ``python tests/mcp_demo.py stdio|http [options]``:

- ``--name N``: the server's name (its tools' descriptions say it, so tests can tell servers apart).
- ``--pid-dir DIR``: write an empty file named after this process's pid into DIR at start.
- ``--gate FIFO``: before serving, block until something is written to this named pipe.
- ``--fail-times N --counter FILE``: exit 1 (before serving) on the first N starts, counted in FILE.
- ``--fail-while FILE``: exit 1 (before serving) while FILE exists.
- ``--linger``: keep a non-daemon thread alive, so the process outlives the end of its stdin
  (as servers with background workers do): only a signal ends it.

In ``http`` mode it serves Streamable HTTP on 127.0.0.1 at a free port and prints ``PORT <n>``.
"""

import argparse
import asyncio
import base64
import os
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

# A 1x1 PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a1a0e0c40000000049454e44ae426082"
)


def build(name: str) -> "MCPServer":
    """The demo server and its tools."""
    # Imported here: a start that is refused (--fail-*) exits before paying for the SDK's import.
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import CallToolResult, ImageContent, TextContent
    from pydantic import BaseModel

    server = MCPServer(name, log_level="WARNING")

    @server.tool(description=f"Echo the text back ({name}).")
    def echo(text: str) -> str:
        return f"{name} says: {text}"

    @server.tool(description="Return tiny PNG images (or text claiming to be one) and a caption.")
    def picture(count: int = 1, bogus: bool = False) -> list[TextContent | ImageContent]:
        data = base64.b64encode(b"not an image at all" if bogus else PNG).decode()
        image = ImageContent(type="image", data=data, mime_type="image/png")
        return [TextContent(type="text", text="a red dot"), *[image] * count]

    @server.tool(description="Add a tool named grown, and tell the client the tool list changed.")
    async def grow(ctx: Context) -> str:  # type: ignore[type-arg]
        server.add_tool(lambda: "grown up", name="grown", description="Added at run time.")
        await ctx.request_context.session.send_tool_list_changed()
        return "grew"

    @server.tool(description="Always fails.")
    def fail(reason: str = "broken") -> str:
        raise ToolError(f"cannot do that: {reason}")

    @server.tool(description="Sleep, then answer.")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done sleeping"

    @server.tool(description="Exit the server process in the middle of the call.")
    def crash() -> str:
        os._exit(3)

    @server.tool(description="Structured weather data (no text content).")
    def weather(city: str) -> CallToolResult:
        return CallToolResult(content=[], structured_content={"city": city, "celsius": 21})

    @server.tool(description="The X-Demo header of the HTTP request that called this tool.")
    def header(ctx: Context) -> str:  # type: ignore[type-arg]
        request = ctx.request_context.request
        return str(request.headers.get("x-demo")) if request is not None else "no HTTP request"

    class Trip(BaseModel):
        city: str
        days: int

    class Plan(BaseModel):
        trips: list[Trip]

    # A dotted name, and an argument whose schema uses $defs/$ref (pydantic's nested models).
    @server.tool(name="plan.trip", description="Plan trips.")
    def plan_trip(plan: Plan) -> str:
        return f"{len(plan.trips)} trip(s), first to {plan.trips[0].city} for {plan.trips[0].days} days"

    @server.tool(name="a_tool_whose_name_is_far_too_long_for_a_model_provider_to_accept_as_is")
    def long_name() -> str:
        return "long"

    @server.tool(description="A lot of text.")
    def flood(chars: int) -> str:
        return "x" * chars

    return server


def _gate_and_count(args: argparse.Namespace) -> None:
    if args.counter:
        counter = Path(args.counter)
        starts = int(counter.read_text() or "0") if counter.exists() else 0
        counter.write_text(str(starts + 1))
        if starts < args.fail_times:
            print(f"demo server: refusing start {starts + 1} of {args.fail_times}", file=sys.stderr)
            sys.exit(1)
    if args.fail_while and Path(args.fail_while).exists():
        print(f"demo server: refusing to start while {args.fail_while} exists", file=sys.stderr)
        sys.exit(1)
    if args.linger:
        threading.Thread(target=threading.Event().wait, name="linger").start()
    if args.pid_dir:
        (Path(args.pid_dir) / str(os.getpid())).touch()
    if args.gate:
        with open(args.gate) as fifo:  # blocks until the test opens the pipe for writing
            fifo.read()


def main() -> None:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--pid-dir")
    parser.add_argument("--gate")
    parser.add_argument("--fail-times", type=int, default=0)
    parser.add_argument("--counter")
    parser.add_argument("--fail-while")
    parser.add_argument("--linger", action="store_true")
    args = parser.parse_args()
    _gate_and_count(args)
    server = build(args.name)
    if args.transport == "stdio":
        server.run("stdio")
        return
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning", lifespan="on")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
