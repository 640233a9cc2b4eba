#!/usr/bin/env bash
# Benchmark (issue 14, not a test): `--bwlimit RATE` over the harness's
# 1 Gbit/s link. A push of incompressible data with `imgsync convert
# --bwlimit RATE` (built-in SSH client, and the pull of the same file, where
# the serving end paces itself at the client's word), timed, with the bytes
# on the wire counted from the veth counters that ../shared/bench/wire.sh
# reads (`wire.sh snap`, sampled every 0.2 s; TCP/IP and ssh overhead
# included): the average over the whole command, and over the transfer
# itself (first to last sample in which bytes moved). Goal: a transfer of about DURATION seconds averages
# within 5 % of RATE on the wire (the forward direction for the push, the
# reverse for the pull).
#
# Link: the namespaces isrc -> idst of ../shared/bench/netns.sh (sshd in
# idst at 10.99.0.2), brought up at 1gbit if down (and down again at the
# end), else reshaped to 1gbit and restored. The source is SIZE of random
# bytes (default RATE x DURATION, made once in OUT_DIR), so zstd cannot
# shrink it and the wire carries what the limit lets through. Outputs go
# to OUT_DIR, never into the repo.
#
#   bench/bwlimit.sh                          # 20M for ~30 s, push and pull
#   RATE=5M DURATION=20 bench/bwlimit.sh
# Env: RATE=20M (imgsync's form), DURATION=30, IMGSYNC (default: cargo build
#   --release, then target/release/imgsync), OUT_DIR=/tmp/bench-data/bwlimit
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$(cd "$top/../shared/bench" && pwd)}
OUT_DIR=${OUT_DIR:-/tmp/bench-data/bwlimit}
RATE=${RATE:-20M}
DURATION=${DURATION:-30}
S=/tmp/bench-ssh
RIP=10.99.0.2

die() { echo "bwlimit.sh: $*" >&2; exit 2; }
say() { echo "$*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (namespaces)"
mkdir -p "$OUT_DIR/bin" || die "cannot make $OUT_DIR"
if [ -z "${IMGSYNC:-}" ]; then
    (cd "$top" && cargo build --release -q) || die "cargo build --release failed"
    IMGSYNC=$top/target/release/imgsync
fi
cp -f "$IMGSYNC" "$OUT_DIR/bin/imgsync" || die "cannot snapshot $IMGSYNC"
BIN=$OUT_DIR/bin/imgsync

# RATE in bytes per second, as imgsync reads it (k, M, G: powers of 1024).
rate_bytes=$(python3 -c '
import sys
s = sys.argv[1]
m = {"": 1024, "k": 1024, "m": 1 << 20, "g": 1 << 30}[s[-1].lower() if s[-1].isalpha() else ""]
print(int(float(s.rstrip("kKmMgG")) * m))' "$RATE") || die "bad RATE $RATE"
size=$((rate_bytes * DURATION))
SRC=$OUT_DIR/src.raw
if [ "$(stat -c %s "$SRC" 2>/dev/null)" != "$size" ]; then
    say "making $SRC ($size random bytes)"
    head -c "$size" /dev/urandom >"$SRC.tmp" && mv "$SRC.tmp" "$SRC" || die "cannot make $SRC"
fi

. "$top/bench/netns-take.sh"
netns_take 1gbit

common=(--bwlimit "$RATE" --known-hosts "$KH" -i "$S/id_ed25519" --ssh-config /dev/null --remote-imgsync "$BIN")

# Runs CMD... in isrc while sampling the veth counters every 0.2 s; prints
# the whole command's wall time and the counters' samples to $1.
sampled() {
    local out=$1; shift
    : >"$out"
    local t0; t0=$(date +%s.%N)
    "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        echo "$(date +%s.%N) $("$SHARED/wire.sh" snap)" >>"$out"
        sleep 0.2
    done
    wait "$pid" || return 1
    echo "$(date +%s.%N) $("$SHARED/wire.sh" snap)" >>"$out"
    echo "wall $t0 $(date +%s.%N)" >>"$out"
}

# label samples-file column(2 fwd, 3 rev): the average over the whole
# command, and over the transfer (from the first to the last sample in
# which the counter moved by more than 64 KiB: connecting, the last
# fsync and the digest check left out).
report() {
    python3 - "$@" "$rate_bytes" <<'EOF2'
import sys
label, path, col, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows, wall = [], None
for line in open(path):
    f = line.split()
    if f[0] == "wall":
        wall = float(f[2]) - float(f[1])
    else:
        rows.append((float(f[0]), int(f[col - 1])))
total = rows[-1][1] - rows[0][1]
moving = [i for i in range(1, len(rows)) if rows[i][1] - rows[i - 1][1] > 65536]
a, b = rows[moving[0] - 1], rows[moving[-1]]
avg = total / wall
win = (b[1] - a[1]) / (b[0] - a[0])
print(f"{label}: {total} wire bytes; whole command {wall:.2f} s = {avg / 2**20:.2f} MiB/s "
      f"({100 * (avg / rate - 1):+.1f} %); transfer {b[0] - a[0]:.2f} s = {win / 2**20:.2f} MiB/s "
      f"({100 * (win / rate - 1):+.1f} % of {rate / 2**20:.2f} MiB/s)")
EOF2
}

rm -f "$OUT_DIR/dst.raw" "$OUT_DIR/back.raw"
say "push: $BIN convert --bwlimit $RATE $SRC ssh://root@$RIP$OUT_DIR/dst.raw"
sampled "$OUT_DIR/push.samples" ip netns exec isrc env -u SSH_AUTH_SOCK \
    "$BIN" convert -q "${common[@]}" "$SRC" "ssh://root@$RIP$OUT_DIR/dst.raw" || die "push failed"
report "push (forward)" "$OUT_DIR/push.samples" 2
cmp -s "$SRC" "$OUT_DIR/dst.raw" || die "push: destination differs"

say "pull: $BIN convert --bwlimit $RATE ssh://root@$RIP$OUT_DIR/dst.raw $OUT_DIR/back.raw"
sampled "$OUT_DIR/pull.samples" ip netns exec isrc env -u SSH_AUTH_SOCK \
    "$BIN" convert -q "${common[@]}" "ssh://root@$RIP$OUT_DIR/dst.raw" "$OUT_DIR/back.raw" || die "pull failed"
report "pull (reverse)" "$OUT_DIR/pull.samples" 3
cmp -s "$SRC" "$OUT_DIR/back.raw" || die "pull: copy differs"
rm -f "$OUT_DIR/dst.raw" "$OUT_DIR/back.raw"
