#!/usr/bin/env bash
# One-shot benchmark for a quiet, many-core machine without internet (issue 12).
#
# Runs `python -m bench` (non-stream direct / floor / gateway with 3 repeats, streaming TTFB,
# 1,000 open streams, start-up) with the processes pinned to separate cores, then the scale-out
# sections (pg: one process on PostgreSQL vs SQLite; workers: --workers 1, 2, 4), and writes
# results.json, results-pg.json, results.md, results-pg.md and the logs to $OUT (default ./bench-out).
#
# Needs, beside the repository: .whl/ (the cp312 wheels of aiohttp, orjson, uvloop, asyncpg and
# their dependencies) and .debs/ (wrk and libluajit; for the scale-out sections also the
# PostgreSQL server where none is installed: `apt-get download postgresql-15 postgresql-client-15 libpq5 libicu72
# libxslt1.1` on Debian 12 (not libllvm14: it only serves JIT, loaded on demand, and the 64 MiB
# carry has no room for it), whatever of its libraries `ldd` finds missing); see the README's
# performance section. Optional: .base/src, a baseline tree (git archive <commit> src | tar -x -C .base):
# its gateway is measured in the same way afterwards (non-stream only), for before/after.
#
# Environment: PYTHON (default python3), OUT, REPEATS (default 3), MAX_SECONDS (default 420),
# BENCH_ARGS (more flags for `python -m bench`, e.g. --quick for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/bench-out}
REPEATS=${REPEATS:-3}
MAX_SECONDS=${MAX_SECONDS:-420}
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
mkdir -p "$OUT"
exec > >(tee "$OUT/quiet_machine.log") 2>&1

echo "== $(date -u +%FT%TZ) $(uname -srm); $($PY --version); $(nproc) CPUs"
lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\))' || true

# 1. Python packages: the wheels, no index, no dependency resolution.
SITE=/tmp/nanobot-site
rm -rf "$SITE"
if $PY -m pip --version >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
else  # no pip: a wheel is a zip of the installed files
    for whl in .whl/*.whl; do $PY -m zipfile -e "$whl" "$SITE"; done
fi
export PYTHONPATH="$SITE:$ROOT/src"
$PY -c 'import aiohttp, orjson, uvloop, nanobot.runtime; print("aiohttp", aiohttp.__version__, "uvloop", uvloop.__version__)'

# 2. wrk: unpack the Debian packages (dpkg -x, or ar + tar where dpkg is missing).
WRKROOT=/tmp/wrkroot
rm -rf "$WRKROOT" && mkdir -p "$WRKROOT"
for deb in .debs/*.deb; do
    if command -v dpkg >/dev/null; then
        dpkg -x "$deb" "$WRKROOT"
    else
        $PY -W ignore - "$deb" "$WRKROOT" <<'EOF'
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"!<arch>\n", "not a .deb"
pos = 8
while pos < len(data):
    name, size = data[pos:pos + 16].strip().decode(), int(data[pos + 48:pos + 58])
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(body)).extractall(sys.argv[2])
    pos += 60 + size + (size & 1)
EOF
    fi
done
export PATH="$WRKROOT/usr/bin:$PATH"
export LD_LIBRARY_PATH="$WRKROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WRK_VERSION=$(wrk --version 2>&1 || true)  # (wrk --version exits 1)
case "$WRK_VERSION" in wrk*) echo "${WRK_VERSION%%$'\n'*}" ;; *) echo "wrk does not run: $WRK_VERSION"; exit 1 ;; esac

# 2b. PostgreSQL for the scale-out sections: the installed one, else the one in .debs/ (already
# unpacked above into $WRKROOT). As root the server runs as the postgres user (tests/pgserver.py).
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    for bin in "$WRKROOT"/usr/lib/postgresql/*/bin; do
        if [ -x "$bin/pg_ctl" ]; then export NANOBOT_PG_BIN=$bin; fi
    done
    if [ -n "${NANOBOT_PG_BIN:-}" ] && [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home postgres || true
    fi
    echo "PostgreSQL: ${NANOBOT_PG_BIN:-none (the pg and workers sections will say they were skipped)}"
fi

# 3. The benchmark: pinning is automatic (bench/cpus.py); the notes under the table say how.
$PY -m bench --only nonstream,streaming,streams,startup --repeats "$REPEATS" \
    --max-seconds "$MAX_SECONDS" --out "$OUT/results.json" "${EXTRA[@]}" | tee "$OUT/results.md"
# The scale-out sections, in a run of their own (so the table above keeps its time budget).
$PY -m bench --only pg,workers --repeats "$REPEATS" --max-seconds "$MAX_SECONDS" \
    --out "$OUT/results-pg.json" "${EXTRA[@]}" | tee "$OUT/results-pg.md" || true
# (bench.cost needs valgrind; where it is installed, instructions per request as well)
if command -v valgrind >/dev/null && command -v callgrind_control >/dev/null; then
    timeout 300 $PY -m bench.cost --n 300 --warmup 100 --conc 1,16 | tee "$OUT/cost.txt" || true
fi

# 4. Optional baseline: the same non-stream section against .base/src's gateway.
if [ -d .base/src/nanobot ]; then
    echo "== baseline gateway from .base/src"
    PYTHONPATH="$SITE:$ROOT/.base/src" $PY -m bench --only nonstream --repeats "$REPEATS" \
        --max-seconds "$MAX_SECONDS" --out "$OUT/results-base.json" "${EXTRA[@]}" \
        | tee "$OUT/results-base.md" || true
fi
echo "== done $(date -u +%FT%TZ); results in $OUT"
