"""The core sections: non-stream load, streaming, many open streams, startup time."""

from __future__ import annotations

import statistics
import subprocess
import sys
from typing import Any

from bench.harness import Bench
from bench.procs import ROOT, RssSampler, child_env, proc_status_kb, reset_hwm
from bench.report import Report, Row, Spread, both, check


def pair(b: Bench, r: Report, key: str, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run ``spec`` direct-to-upstream, then through the gateway (if it runs); keep both raw."""
    direct = b.load({**spec, "url": b.direct_url})
    gateway = b.load({**spec, "url": b.gateway_url}) if b.gateway_pid else None
    r.raw[key] = {"direct": direct, "gateway": gateway}
    return direct, gateway


def _get(result: dict[str, Any] | None, key: str) -> float | None:
    if result is None:
        return None
    value = result.get(key)
    return float(value) if isinstance(value, int | float) else None


def _errors_row(r: Report, section: str, label: str, d: dict[str, Any], g: dict[str, Any] | None) -> None:
    """A row for failed requests, only when there were any."""
    if d["errors"] or (g and g["errors"]):
        sample = (g or {}).get("error_sample") or d.get("error_sample", "")
        r.add(
            Row(
                section,
                f"{label} failed requests",
                d["errors"],
                g["errors"] if g else None,
                target="0",
                ok=False,
                note=sample[:120].replace("|", "/"),
            )
        )


Result = dict[str, Any]
KEY_POINTS = (1, 16, 64)


def _point(b: Bench, conc: int) -> tuple[Result, Result | None, Result | None]:
    """One non-stream point, direct, through the floor and through a fresh gateway, back to back
    (so a slow drift of the machine touches all three alike)."""
    s = b.settings
    spec = {"kind": "closed", "concurrency": conc, "duration": s.duration, "warmup": s.warmup}
    direct = b.load({**spec, "url": b.direct_url})
    floor = b.load({**spec, "url": b.floor_url}) if b.floor_port else None
    gateway = None
    if b.gateway_pid:
        b.restart_gateway()  # same starting state for every repeat: no sessions, empty database
        gateway = b.load({**spec, "url": b.gateway_url})
    return direct, floor, gateway


def _median_run(runs: list[Result | None], key: str) -> Result | None:
    """The run whose ``key`` is the median of the repeats (its other numbers come with it)."""
    done = sorted((r for r in runs if r is not None), key=lambda r: float(r[key]))
    return done[(len(done) - 1) // 2] if done else None


def _errors(runs: list[Result | None]) -> Result | None:
    """All repeats' errors as one result (for the failed-requests row)."""
    done = [r for r in runs if r is not None]
    if not done:
        return None
    sample = next((r["error_sample"] for r in done if r.get("error_sample")), "")
    return {"errors": sum(int(r["errors"]) for r in done), "error_sample": sample}


def nonstream(b: Bench, r: Report) -> None:
    """Section 1: non-stream throughput and latency (direct / floor / gateway, each point
    repeated on a fresh gateway: rows show the median run), then one shared session."""
    s = b.settings
    sec = "1 non-stream"
    runs: dict[int, list[tuple[Result, Result | None, Result | None]]] = {c: [] for c in KEY_POINTS}
    for _ in range(s.repeats):
        for conc in KEY_POINTS:
            runs[conc].append(_point(b, conc))
    r.raw["nonstream_repeats"] = {
        f"c{c}": [{"direct": d, "floor": f, "gateway": g} for d, f, g in points] for c, points in runs.items()
    }
    for conc in KEY_POINTS:
        cols = list(zip(*runs[conc], strict=True))
        key = "p50_ms" if conc == 1 else "rps"
        d, f, g = (_median_run(list(col), key) for col in cols)
        assert d is not None
        _nonstream_rows(r, sec, conc, d, f, g, [_errors(list(col)) for col in cols])
        for metric, unit, field in (("p50 latency", "ms", "p50_ms"), ("throughput", "req/s", "rps")):
            if (conc == 1) == (field == "p50_ms"):
                r.spreads.append(
                    Spread(
                        f"c={conc} {metric}",
                        unit,
                        *([float(x[field]) for x in col if x is not None] for col in cols),
                    )
                )
    shared_session(b, r)


def _nonstream_rows(
    r: Report,
    sec: str,
    conc: int,
    d: Result,
    f: Result | None,
    g: Result | None,
    errs: list[Result | None],
) -> None:
    rps_d, rps_f, rps_g = _get(d, "rps"), _get(f, "rps"), _get(g, "rps")
    row = r.add(
        Row(sec, f"c={conc} distinct sessions: throughput", rps_d, rps_g, "req/s", "ratio", floor=rps_f)
    )
    # Every answer's body is checked (bench.loadgen / bench.wrk): one bad 200 fails the row.
    valid = None if g is None else all(e is None or e["errors"] == 0 for e in errs)
    if conc == 16:
        row.target = ">= 70% of floor, every body valid"
        share = rps_g / rps_f if rps_g is not None and rps_f else None
        row.ok = both(check(share, lambda v: v >= 0.7), valid)
        if rps_g is not None and rps_d:
            row.note = f"issue 5's bar: >= 1,500 req/s and >= 30% of direct: {100 * rps_g / rps_d:.0f}%"
    elif valid is False:
        row.target, row.ok = "every body valid", False
    p50 = r.add(
        Row(
            sec,
            f"c={conc} p50 latency",
            _get(d, "p50_ms"),
            _get(g, "p50_ms"),
            "ms",
            "added",
            floor=_get(f, "p50_ms"),
        )
    )
    p99 = r.add(
        Row(
            sec,
            f"c={conc} p99 latency",
            _get(d, "p99_ms"),
            _get(g, "p99_ms"),
            "ms",
            "added",
            floor=_get(f, "p99_ms"),
        )
    )
    if conc == 1:
        p50.target, p99.target = "<= floor + 0.3 ms", "<= direct + 5 ms"
        if g is not None:
            p50.ok = check(g["p50_ms"] - f["p50_ms"], lambda v: v <= 0.3) if f is not None else None
            p99.ok = check(g["p99_ms"] - d["p99_ms"], lambda v: v <= 5.0)
    e_d, e_f, e_g = errs
    assert e_d is not None
    _errors_row(r, sec, f"c={conc}", e_d, e_g if e_g is not None else None)
    if e_f is not None and e_f["errors"]:
        r.note(f"floor proxy c={conc}: {e_f['errors']} failed requests ({e_f['error_sample'][:120]})")


def shared_session(b: Bench, r: Report) -> None:
    """Section 1, last: 16 clients on ONE session (serialised turns, fair, every body valid)."""
    s = b.settings
    sec = "1 non-stream"
    if not b.gateway_pid:
        return
    b.restart_gateway()
    spec = {
        "kind": "closed",
        "concurrency": 16,
        "duration": s.duration,
        "warmup": s.warmup,
        "session": "shared",
        "validate": True,
    }
    g = b.load({**spec, "url": b.gateway_url})
    r.raw["nonstream_c16_shared"] = {"gateway": g}
    total = g["requests"] + g["errors"]
    r.add(
        Row(
            sec,
            "c=16 ONE session: all 200 + valid body",
            None,
            g["requests"],
            "ok of " + f"{total:,}",
            target="every request 200",
            ok=g["errors"] == 0 and g["requests"] > 0,
            note=g["error_sample"][:120].replace("|", "/"),
        )
    )
    r.add(Row(sec, "c=16 ONE session: throughput (serialized)", None, g["rps"], "req/s"))
    r.add(
        Row(
            sec, "c=16 ONE session: p50 / p99 wait", None, g["p50_ms"], "ms", note=f"p99 {g['p99_ms']:.2f} ms"
        )
    )
    lo, hi = g["per_worker_min"], g["per_worker_max"]
    r.add(
        Row(
            sec,
            "c=16 ONE session: per-worker completions min/max",
            None,
            lo / hi if hi else None,
            "ratio",
            target="fair: >= 0.8",
            ok=check(lo / hi if hi else None, lambda v: v >= 0.8),
            note=f"{lo}..{hi} per worker",
        )
    )
    r.add(
        Row(
            sec,
            "c=16 ONE session: max wait of any request",
            None,
            g["max_ms"],
            "ms",
            note=f"≈ {g['max_ms'] / g['p50_ms']:.1f}x p50" if g["p50_ms"] else "",
        )
    )


def streaming(b: Bench, r: Report) -> None:
    """Section 2: time to first byte, and relay rate of a 2,000-delta stream."""
    s = b.settings
    sec = "2 streaming"
    d, g = pair(b, r, "ttfb", {"kind": "ttfb", "n": s.ttfb_n, "content": "deltas=4 delay_ms=0"})
    row = r.add(
        Row(
            sec,
            f"TTFB p50 (first data: line, n={s.ttfb_n})",
            _get(d, "p50_ms"),
            _get(g, "p50_ms"),
            "ms",
            "added",
            "added <= 2 ms",
        )
    )
    if g is not None:
        row.ok = check(g["p50_ms"] - d["p50_ms"], lambda v: v <= 2.0)
    r.add(Row(sec, "TTFB p99", _get(d, "p99_ms"), _get(g, "p99_ms"), "ms", "added"))
    _errors_row(r, sec, "TTFB", d, g)
    spec = {"kind": "stream_rate", "n": s.rate_n, "deltas": s.rate_deltas}
    d, g = pair(b, r, "stream_rate", spec)
    r.add(
        Row(
            sec,
            f"{s.rate_deltas:,}-delta stream relay rate (median of {s.rate_n})",
            _get(d, "deltas_per_s"),
            _get(g, "deltas_per_s"),
            "deltas/s",
            "ratio",
            ">= 20,000 deltas/s",
            check(_get(g, "deltas_per_s"), lambda v: v >= 20_000),
        )
    )
    if g is not None and g["complete"] < s.rate_n:
        r.add(
            Row(
                sec,
                "2,000-delta streams complete",
                d["complete"],
                g["complete"],
                target=f"{s.rate_n}",
                ok=False,
                note=g["error_sample"][:120],
            )
        )


def many_streams(b: Bench, r: Report) -> None:
    """Section 3: 1,000 concurrent slow streams all complete; gateway peak RSS."""
    s = b.settings
    sec = "3 open streams"
    spec = {
        "kind": "streams",
        "n": s.streams_n,
        "deltas": s.streams_deltas,
        "delay_ms": s.streams_delay_ms,
        "timeout": 120,
    }
    direct = b.load({**spec, "url": b.direct_url}, timeout=180)
    gateway, sampled, hwm, base = None, 0, 0, 0
    pid = b.gateway_pid
    if pid:
        reset = reset_hwm(pid)
        base = proc_status_kb(pid, "VmRSS")
        with RssSampler(pid) as sampler:
            gateway = b.load({**spec, "url": b.gateway_url}, timeout=180)
        sampled = sampler.max_kb
        hwm = proc_status_kb(pid, "VmHWM") if reset else 0
    r.raw["many_streams"] = {
        "direct": direct,
        "gateway": gateway,
        "gateway_rss_before_kb": base,
        "gateway_rss_sampled_max_kb": sampled,
        "gateway_vmhwm_kb": hwm,
    }
    label = f"{s.streams_n:,} streams x {s.streams_deltas} deltas {s.streams_delay_ms} ms apart: complete"
    r.add(
        Row(
            sec,
            label,
            direct["complete"],
            _get(gateway, "complete"),
            f"of {s.streams_n:,}",
            target="100%",
            ok=check(_get(gateway, "complete"), lambda v: v == s.streams_n),
        )
    )
    r.add(
        Row(
            sec,
            "wall time for all",
            direct["wall_s"],
            _get(gateway, "wall_s"),
            "s",
            "added",
            note=f"ideal {direct['ideal_s']:.1f} s",
        )
    )
    r.add(
        Row(
            sec,
            "TTFB p99 under that load",
            direct["ttfb_p99_ms"],
            _get(gateway, "ttfb_p99_ms"),
            "ms",
            "added",
        )
    )
    _errors_row(r, sec, "streams", direct, gateway)
    if pid:
        peak_mb = max(sampled, hwm) / 1024
        r.add(
            Row(
                sec,
                "gateway peak RSS (VmHWM / sampled VmRSS)",
                None,
                peak_mb,
                "MB",
                target="<= 300 MB",
                ok=check(peak_mb, lambda v: v <= 300),
                note=f"before {base / 1024:.0f} MB; sampled {sampled / 1024:.0f}, VmHWM {hwm / 1024:.0f}",
            )
        )


def startup(b: Bench, r: Report) -> None:
    """Section 6: seconds from ``nanobot serve`` start to ``GET /health`` 200 (fresh processes)."""
    if b.gateway_error:
        r.add(
            Row(
                "6 startup",
                "nanobot serve start -> /health 200",
                unit="s",
                target="<= 1 s",
                ok=None,
                note=b.gateway_error.splitlines()[0][:120],
            )
        )
        return
    times = [b.startup_s] if b.startup_s is not None else []
    for i in range(b.settings.startup_runs - len(times)):
        proc, _, took = b.launch_gateway(f"gateway-startup-{i}")
        b.children.stop(proc)
        times.append(took)
    r.raw["startup_s"] = times
    med = statistics.median(times)
    r.add(
        Row(
            "6 startup",
            f"nanobot serve start -> /health 200 (median of {len(times)})",
            None,
            med,
            "s",
            target="<= 1 s",
            ok=check(med, lambda v: v <= 1.0),
            note=f"min {min(times):.3f}, max {max(times):.3f} s",
        )
    )
    total, heavy = import_profile("nanobot.runtime")
    r.raw["import_nanobot_runtime"] = {"seconds": total, "top_packages": heavy}
    if total is not None:
        top = ", ".join(f"{name} {sec * 1000:.0f} ms" for name, sec in heavy[:4])
        r.add(
            Row(
                "6 startup",
                "of which: import nanobot.runtime (under -X importtime)",
                None,
                total,
                "s",
                note=f"heaviest top-level packages: {top}",
            )
        )


def import_profile(module: str) -> tuple[float | None, list[tuple[str, float]]]:
    """Seconds to import ``module`` in a fresh child, and top-level packages by cumulative time."""
    argv = [sys.executable, "-X", "importtime", "-c", f"import {module}"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, env=child_env(), cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return None, []
    total: float | None = None
    top: list[tuple[str, float]] = []
    for line in done.stderr.decode(errors="replace").splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name, cumulative = parts[2].rstrip(), int(parts[1]) / 1e6
        nested = name.startswith("   ")  # depth >= 1: imported while importing ``module``
        if name.strip() == module:
            total = cumulative
        elif nested and "." not in name.strip() and name.strip() != module.split(".")[0]:
            top.append((name.strip(), cumulative))
    top.sort(key=lambda item: -item[1])
    return total, top[:10]
