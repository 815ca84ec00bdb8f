#!/usr/bin/env bash
# The PostgreSQL wallet the wallet bench is compared with (issue 3): the same operations
# (a hold, then a settle, each its own durable transaction: row lock on the tenant's
# wallet, balance update, ledger insert, commit) over 10,000 tenants, driven by pgbench
# with 8, 16, 32, 64 and 256 clients. Run it in the same sitting as
# `cargo bench --bench wallet` and compare the rates (BENCHMARKS.md).
#
# Usage: benches/pg_wallet.sh   (env: BENCH_DIR scratch on the disk under test, default
# target/bench-scratch; BENCH_SECS per client count, default 10; PG_BIN, default the
# newest /usr/lib/postgresql/*/bin; CLIENTS, default "8 16 32 64 256").
# Needs a PostgreSQL server package (Debian: postgresql) and pgbench; runs the server as
# the `postgres` user when started as root (PostgreSQL refuses to run as root). The
# server keeps its defaults for durability: fsync on, synchronous_commit on, so every
# commit waits for the WAL flush, as every wallet operation here waits for fdatasync.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PG_BIN/postgres" ] || { echo "no PostgreSQL server found (set PG_BIN)"; exit 2; }
command -v pgbench >/dev/null || { echo "pgbench not found"; exit 2; }
SECS=${BENCH_SECS:-10}
CLIENTS=${CLIENTS:-"8 16 32 64 256"}
BASE=${BENCH_DIR:-target/bench-scratch}
mkdir -p "$BASE"
WORK=$(mktemp -d "$(realpath "$BASE")/pg.XXXXXX")
PORT=${PG_PORT:-55432}
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi
}
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK"
cleanup() { as_pg "'$PG_BIN/pg_ctl' -D '$WORK/data' -m immediate stop" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

as_pg "'$PG_BIN/initdb' -D '$WORK/data' -A trust -U postgres" >/dev/null
# Enough connections for 256 clients; buffers sized for the data; everything else default.
as_pg "'$PG_BIN/pg_ctl' -D '$WORK/data' -l '$WORK/log' -w -o '-p $PORT -k $WORK -c max_connections=300 -c shared_buffers=512MB' start" >/dev/null
PSQL="psql -q -h $WORK -p $PORT -U postgres -v ON_ERROR_STOP=1"

$PSQL <<'SQL'
CREATE TABLE wallets (tenant int PRIMARY KEY, available bigint NOT NULL, held bigint NOT NULL,
  spent bigint NOT NULL, CHECK (available >= 0 AND held >= 0));
CREATE TABLE ledger (id bigserial PRIMARY KEY, tenant int NOT NULL, kind text NOT NULL,
  batch bigint NOT NULL, amount bigint NOT NULL, available_after bigint NOT NULL,
  held_after bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
INSERT INTO wallets SELECT t, 1000000000000, 0, 0 FROM generate_series(1, 10000) t;
VACUUM ANALYZE wallets;
SQL

cat > "$WORK/hold_settle.sql" <<'SQL'
\set t random(1, 10000)
\set b random(1, 1000000000)
BEGIN;
SELECT available FROM wallets WHERE tenant = :t FOR UPDATE;
UPDATE wallets SET available = available - 10, held = held + 10 WHERE tenant = :t
  RETURNING available, held \gset
INSERT INTO ledger (tenant, kind, batch, amount, available_after, held_after)
  VALUES (:t, 'hold', :b, 10, :available, :held);
COMMIT;
BEGIN;
SELECT held FROM wallets WHERE tenant = :t FOR UPDATE;
UPDATE wallets SET held = held - 10, spent = spent + 10 WHERE tenant = :t
  RETURNING available, held \gset
INSERT INTO ledger (tenant, kind, batch, amount, available_after, held_after)
  VALUES (:t, 'settle', :b, 10, :available, :held);
COMMIT;
SQL
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK/hold_settle.sql"

echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), fsync on, synchronous_commit on; $SECS s per client count"
echo "each script run is a hold + a settle: two durable transactions (= two wallet operations)"
for c in $CLIENTS; do
  threads=$(( c < 2 ? 1 : 2 ))
  out=$(as_pg "pgbench -n -h '$WORK' -p $PORT -U postgres -c $c -j $threads -T $SECS -f '$WORK/hold_settle.sql' postgres" 2>&1)
  runs=$(echo "$out" | awk -F'= ' '/^tps/ {print $2; exit}' | awk '{print $1}')
  lat=$(echo "$out" | awk -F'= ' '/latency average/ {print $2}' | awk '{print $1}')
  ops=$(awk -v r="$runs" 'BEGIN { printf "%.0f", r * 2 }')
  echo "postgres wallet, $c clients: $ops ops/s ($runs hold+settle pairs/s, pair latency avg $lat ms)"
done
