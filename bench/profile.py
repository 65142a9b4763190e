"""``--profile``: sample the gateway with py-spy under c=16 load and report its hot spots.

py-spy records collapsed stacks (``--format raw``) of the gateway process while the load
generator drives c=16 non-stream requests on distinct sessions. We report, as shares of the
non-idle samples: the functions most often on top of the stack (self time), and the
gateway's own (``nanobot``) functions most often anywhere on it (inclusive time).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.harness import Bench
from bench.report import Report, Row

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    """The py-spy executable beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """``func (file.py:12)`` -> ``func (file.py)``."""
    m = _FRAME.match(frame.strip())
    return f"{m['func']} ({m['file']})" if m else frame.strip()


class Profile:
    """Sample counts from py-spy's collapsed stacks (recorded with ``--threads``)."""

    def __init__(self) -> None:
        self.total = 0
        self.leaf: Counter[str] = Counter()  # self time: the frame on top of the stack
        self.incl: Counter[str] = Counter()  # inclusive: anywhere on the stack, once per stack
        self.threads: Counter[str] = Counter()  # by thread name
        self.entry: set[str] = set()  # frames up to and including the event loop's run()

    def entry_frames(self) -> set[str]:
        """Frames below the event loop (``<module>``, ``main``, ``Runner.run``...): no information."""
        return self.entry


def parse_collapsed(text: str) -> Profile:
    """Parse ``frame;frame;... count`` lines (a ``thread (tid): name`` frame first, if present)."""
    prof = Profile()
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        raw = [f for f in stack.split(";") if f and not f.startswith("process ")]
        thread = "all"
        if raw and raw[0].startswith("thread ("):
            thread = raw.pop(0).split(": ", 1)[-1]
        frames = [_frame_name(f) for f in raw]
        if not frames:
            continue
        prof.total += count
        prof.threads[thread] += count
        prof.leaf[frames[-1]] += count
        loop_at = next((i for i, f in enumerate(frames) if f.startswith("Runner.run ")), -1)
        prof.entry.update(frames[: loop_at + 1])
        for name in set(frames):
            prof.incl[name] += count
    return prof


def profile_gateway(b: Bench, r: Report, out_dir: Path, seconds: float | None = None) -> None:
    """Record the gateway under c=16 load; add the top hot spots to the report."""
    sec = "profile"
    spy = find_py_spy()
    pid = b.gateway_pid
    if spy is None or not pid:
        r.add(
            Row(
                sec,
                "py-spy hot spots",
                note="skipped: " + ("py-spy not installed" if spy is None else "gateway not running"),
            )
        )
        return
    seconds = seconds or (3.0 if b.settings.quick else 8.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = out_dir / "profile-pyspy.txt"
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "200",
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "-o",
        str(raw_path),
    ]
    spy_proc = b.children.spawn("py-spy", argv)
    try:
        b.load(
            {
                "kind": "closed",
                "url": b.gateway_url,
                "concurrency": 16,
                "duration": seconds + 0.5,
                "warmup": 0.2,
            }
        )
        spy_proc.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        b.children.stop(spy_proc)
    if not raw_path.exists():
        r.add(Row(sec, "py-spy hot spots", note="py-spy wrote nothing: " + b.children.log_tail("py-spy", 2)))
        return
    prof = parse_collapsed(raw_path.read_text(errors="replace"))
    total = max(1, prof.total)
    skip = prof.entry_frames()
    own = [(name, n) for name, n in prof.incl.most_common() if "nanobot" in name and name not in skip][:12]
    r.raw["profile"] = {
        "samples": prof.total,
        "threads": dict(prof.threads),
        "self": [[name, n] for name, n in prof.leaf.most_common(40)],
        "inclusive": [[name, n] for name, n in prof.incl.most_common(80)],
        "raw_file": str(raw_path),
    }
    threads = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in prof.threads.most_common(4))
    r.note(
        f"Profile: py-spy at 200 Hz, {prof.total:,} non-idle samples of the gateway at c=16 over "
        f"{seconds:.0f} s (by thread: {threads}). Self time of `Runner.run` = time in the native event "
        "loop (uvloop, C extensions, syscalls) with no Python frame above it; with uvloop, task steps "
        f"start their own stacks. Collapsed stacks: {raw_path} (flamegraph.pl / speedscope)."
    )
    for name, n in prof.leaf.most_common(12):
        r.add(Row(sec, f"self: {name}", None, 100 * n / total, "% samples"))
    for name, n in own:
        r.add(Row(sec, f"inclusive: {name}", None, 100 * n / total, "% samples"))
