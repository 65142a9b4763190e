"""``python -m bench``: run the benchmark, print a markdown table, write JSON.

Flags: ``--quick`` (smoke run, < 60 s), ``--only SECTION`` (repeatable or comma-separated:
nonstream, streaming, streams, attachments, channels, startup, mcp, pg, workers), ``--out PATH``
(JSON, default ``bench/results.json``), ``--no-pin`` (pinning is automatic where the machine has the cores:
see ``bench/cpus.py``), ``--repeats N`` (non-stream points, default 3), ``--profile`` (sample
the gateway with py-spy under c=16 load and print its hot spots).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import extras, mcp_section, pg_section, sections
from bench.harness import Bench, Settings
from bench.procs import HarnessError, machine_info
from bench.report import Report
from bench.wrk import wrk_path

SECTIONS: dict[str, Callable[[Bench, Report], None]] = {
    "nonstream": sections.nonstream,
    "streaming": sections.streaming,
    "streams": sections.many_streams,
    "attachments": extras.attachments,
    "channels": extras.channels,
    "startup": sections.startup,
    "mcp": mcp_section.mcp,
    "pg": pg_section.pg,
    "workers": pg_section.workers,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="python -m bench", description="nanobot gateway benchmark (issue 5)")
    p.add_argument("--quick", action="store_true", help="short durations: a smoke run under 60 s")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SECTION",
        help=f"run only these sections (repeatable, comma-separated): {', '.join(SECTIONS)}",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin (by default upstream, server and load generator get their own cores when "
        ">= 6 CPUs / 4 physical cores)",
    )
    p.add_argument("--pin", dest="pin", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of each non-stream point (min/median/max), >= 1"
    )
    p.add_argument(
        "--profile", action="store_true", help="py-spy the gateway under c=16 load; print hot spots"
    )
    p.add_argument(
        "--client",
        choices=("auto", "python", "wrk"),
        default="auto",
        help="load generator for non-stream distinct-session points (auto: wrk if installed)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="abort the run after this many seconds (default: 180 quick, 600 full)",
    )
    args = p.parse_args(argv)
    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.only = only
    return args


def _raise_nofile() -> None:
    """Raise the open-files soft limit to the hard limit (1,000 streams need ~2,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )


class BudgetExceeded(BaseException):
    """The whole run took longer than ``--max-seconds`` (a BaseException: no section swallows it)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise BudgetExceeded("the run exceeded its time budget (--max-seconds)")


def run(args: argparse.Namespace) -> Report:
    """Start everything, run the chosen sections, and return the report (children always killed)."""
    settings = Settings.make(args.quick, max(1, args.repeats))
    chosen = args.only or list(SECTIONS)
    report = Report(
        machine_info(),
        {"quick": settings.quick, "repeats": settings.repeats, "sections": ",".join(chosen)},
    )
    client = args.client if args.client != "auto" else ("wrk" if wrk_path() else "python")
    if client == "wrk" and not wrk_path():
        raise HarnessError("--client wrk: wrk is not installed (apt-get install wrk)")
    report.settings["client"] = client
    with contextlib.suppress(OSError), open("/proc/loadavg") as fh:
        report.settings["loadavg_at_start"] = fh.read().split()[0]
    with (
        tempfile.TemporaryDirectory(prefix="nanobot-bench-") as tmp,
        Bench(Path(tmp), settings, args.pin, telegram="channels" in chosen) as bench,
    ):
        bench.client = client
        report.settings["pin"] = bench.cpus.pinned
        report.note(
            f"Processes: load generator, fake upstream, and the server under test (the floor proxy or "
            f"the gateway, one at a time) on {report.machine['cores']} CPUs: {bench.cpus.note}."
        )
        report.note(
            "floor = a bare aiohttp proxy (bench/floor.py: receive, forward the body on one pooled "
            "ClientSession to the same upstream, return its answer): what any aiohttp server + client "
            "pair costs per request; the gateway's own cost is what it adds on top. Non-stream rows "
            "only (it does not stream)."
        )
        bench.start_upstream()
        bench.start_floor()
        if not bench.start_gateway():
            report.note(f"Gateway not measured: {bench.gateway_error.splitlines()[0]}")
            print(f"gateway unavailable: {bench.gateway_error}", file=sys.stderr)
        elif bench.startup_s is not None:
            report.raw["gateway_pid"] = bench.gateway_pid
        for name in chosen:
            t0 = time.perf_counter()
            print(f"[bench] section {name} ...", file=sys.stderr, flush=True)
            try:
                SECTIONS[name](bench, report)
            except HarnessError as exc:
                report.note(f"Section {name} aborted: {str(exc).splitlines()[0]}")
                print(f"[bench] section {name} failed: {exc}", file=sys.stderr)
            print(f"[bench] section {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.profile:
            from bench.profile import profile_gateway

            profile_gateway(bench, report, args.out.resolve().parent)
        if bench.gateway_pid:
            report.raw["upstream_stats"] = bench.upstream_stats()
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 even when targets fail; 1 on harness errors)."""
    args = parse_args(argv)
    _raise_nofile()
    budget = args.max_seconds or (180 if args.quick else 600)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(budget))
    t0 = time.perf_counter()
    try:
        report = run(args)
    except (HarnessError, BudgetExceeded) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    report.settings["run_seconds"] = round(time.perf_counter() - t0, 1)
    print(report.markdown())
    report.write_json(args.out)
    print(f"\nJSON written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
