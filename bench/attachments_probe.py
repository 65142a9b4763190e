"""Probe: time and peak memory to prepare ~10 MB PDF/DOCX/XLSX/PPTX uploads (Linux only).

    .venv/bin/python bench/attachments_probe.py [--size BYTES] [--cache DIR]

For each format: a fresh extractor worker is warmed up with a tiny file, then the big
file is prepared; reported are the wall time of ``prepare_file``, the worker's peak RSS
growth (VmHWM minus its RSS when idle) and the gateway process's peak RSS growth. A
last run prepares 8 big files concurrently and reports the gateway's peak RSS growth.
Sample files are generated with ``tests/samples.py`` and cached (generation is slow).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nanobot.attachments import AttachmentLimits, prepare_file, shutdown_extractors

import samples

MiB = 1024 * 1024
GENERATORS: dict[str, Callable[[int], bytes]] = {
    "pdf": samples.make_pdf_of_size,
    "docx": samples.make_docx_of_size,
    "xlsx": samples.make_xlsx_of_size,
    "pptx": samples.make_pptx_of_size,
}
TINY: dict[str, Callable[[], bytes]] = {
    "pdf": lambda: samples.make_pdf(["warm up"]),
    "docx": lambda: samples.make_docx(["warm up"]),
    "xlsx": lambda: samples.make_xlsx({"S": [["warm up"]]}),
    "pptx": lambda: samples.make_pptx(["warm up"]),
}


def status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` value from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def child_pids() -> list[int]:
    """Our extractor workers (child processes started by multiprocessing's spawn_main)."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def load(kind: str, size: int, cache: Path) -> bytes:
    """The cached sample of ``kind`` and ``size``, generated on first use."""
    path = cache / f"sample-{size}.{kind}"
    if not path.exists():
        path.write_bytes(GENERATORS[kind](size))
    return path.read_bytes()


async def probe_one(kind: str, data: bytes, limits: AttachmentLimits) -> None:
    """Prepare one big file in a fresh, warmed-up worker and print time and memory."""
    await shutdown_extractors()
    await prepare_file(f"warm.{kind}", TINY[kind](), limits)
    (worker,) = child_pids()
    reset_peak(worker)
    idle = status_kib(worker, "VmRSS")
    parent_before = status_kib(os.getpid(), "VmRSS")
    started = time.perf_counter()
    prepared = await prepare_file(f"big.{kind}", data, limits)
    elapsed = time.perf_counter() - started
    growth = (status_kib(worker, "VmHWM") - idle) / 1024
    parent_growth = (status_kib(os.getpid(), "VmRSS") - parent_before) / 1024
    print(
        f"{kind:5} {len(data) / MiB:5.1f} MiB  {elapsed:5.2f} s  worker peak +{growth:6.1f} MiB "
        f"({growth * MiB / len(data):4.1f}x file)  gateway +{parent_growth:5.1f} MiB  "
        f"text {len(prepared.text or ''):,} chars"
    )


async def probe_concurrent(files: list[tuple[str, bytes]], limits: AttachmentLimits) -> None:
    """Prepare all files at once; print the gateway's peak RSS growth."""
    reset_peak(os.getpid())
    before = status_kib(os.getpid(), "VmRSS")
    started = time.perf_counter()
    await asyncio.gather(
        *(prepare_file(f"f{i}.{kind}", data, limits) for i, (kind, data) in enumerate(files))
    )
    elapsed = time.perf_counter() - started
    after = status_kib(os.getpid(), "VmHWM")
    growth = (after - before) / 1024
    print(
        f"{len(files)} concurrent: {elapsed:.2f} s; gateway peak RSS +{growth:.1f} MiB "
        f"(inputs already loaded: {sum(len(d) for _, d in files) / MiB:.0f} MiB)"
    )


async def main() -> None:
    """Run the probes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10 * MiB)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/nanobot-attachment-samples"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    limits = AttachmentLimits(max_file_bytes=max(args.size, 10 * MiB))
    files = {kind: load(kind, args.size, args.cache) for kind in GENERATORS}
    try:
        for kind, data in files.items():
            await probe_one(kind, data, limits)
        await probe_concurrent([*files.items(), *files.items()], limits)
    finally:
        await shutdown_extractors()


if __name__ == "__main__":
    asyncio.run(main())
