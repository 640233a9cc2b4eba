#!/usr/bin/env bash
# Benchmark (issue 14, not a test): `--bwlimit RATE` over the harness's
# 1 Gbit/s link. A push of incompressible data with `imgsync convert
# --bwlimit RATE` (built-in SSH client, and the pull of the same file, where
# the serving end paces itself at the client's word), timed, with the bytes
# on the wire counted by ../shared/bench/wire.sh (veth counters, TCP/IP and
# ssh overhead included). Goal: a transfer of about DURATION seconds averages
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
report() { # label wall-seconds bytes
    python3 - "$@" "$rate_bytes" <<'EOF'
import sys
label, wall, wire, rate = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
avg = wire / wall
print(f"{label}: {wire} wire bytes in {wall:.2f} s = {avg / 2**20:.2f} MiB/s "
      f"({100 * (avg / rate - 1):+.1f} % of {rate / 2**20:.2f} MiB/s)")
EOF
}

rm -f "$OUT_DIR/dst.raw" "$OUT_DIR/back.raw"
say "push: $BIN convert --bwlimit $RATE $SRC ssh://root@$RIP$OUT_DIR/dst.raw"
t0=$(date +%s.%N)
"$SHARED/wire.sh" -o "$OUT_DIR/push.wire" -- ip netns exec isrc env -u SSH_AUTH_SOCK \
    "$BIN" convert -q "${common[@]}" "$SRC" "ssh://root@$RIP$OUT_DIR/dst.raw" || die "push failed"
t1=$(date +%s.%N)
read -r fwd rev _ _ <"$OUT_DIR/push.wire"
report "push (forward)" "$(echo "$t1 - $t0" | bc)" "$fwd"
cmp -s "$SRC" "$OUT_DIR/dst.raw" || die "push: destination differs"

say "pull: $BIN convert --bwlimit $RATE ssh://root@$RIP$OUT_DIR/dst.raw $OUT_DIR/back.raw"
t0=$(date +%s.%N)
"$SHARED/wire.sh" -o "$OUT_DIR/pull.wire" -- ip netns exec isrc env -u SSH_AUTH_SOCK \
    "$BIN" convert -q "${common[@]}" "ssh://root@$RIP$OUT_DIR/dst.raw" "$OUT_DIR/back.raw" || die "pull failed"
t1=$(date +%s.%N)
read -r fwd rev _ _ <"$OUT_DIR/pull.wire"
report "pull (reverse)" "$(echo "$t1 - $t0" | bc)" "$rev"
cmp -s "$SRC" "$OUT_DIR/back.raw" || die "pull: copy differs"
rm -f "$OUT_DIR/dst.raw" "$OUT_DIR/back.raw"
