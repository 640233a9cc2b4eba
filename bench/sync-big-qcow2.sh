#!/usr/bin/env bash
# Benchmark (issue 13, memory and allocation): `imgsync sync` into a qcow2
# DST of 1 TiB virtual size holding ~2 GiB of data spread over the whole
# range, so that it has many L2 tables (2048 runs of 1 MiB at random 1 MiB
# slots; one L2 table of a 64 KiB-cluster image covers 512 MiB, so ~1300 L2
# tables). Goals of issue 13:
#   rss    peak RSS <= 256 MiB on both ends (/usr/bin/time -f %M), whatever
#          the number of L2 tables
#   alloc  DST's allocated bytes (stat %b x 512, as du -B1) <= those of
#          `qemu-img convert -O qcow2 -o cluster_size=65536 new.qcow2 ref.qcow2`
#          + 5 % + one cluster per L2 table (DST's L2 tables)
#   read   (info) a new DST reads SRC once: bytes-read vs SRC's data
#
# Images (made once, cached in IMG_DIR, regenerated when the parameters
# change; ~1-2 min): old.qcow2 = the runs above, 64 KiB clusters, made as a
# sparse raw file by python (pwrite at the runs' offsets) then `qemu-img
# convert -O qcow2`; new.qcow2 = old with ~2 % of the data rewritten in
# scattered 64 KiB blocks, some runs discarded (whole runs and single 64 KiB
# blocks become holes) and ~100 MiB of new 1 MiB runs in former holes spread
# over the whole range (the last MiB of the disk included); ref.qcow2 =
# qemu-img's own convert of new.qcow2 (the allocation reference). The raw
# files are deleted once converted.
#
# Rows (SRC = new.qcow2; DST seeded untimed with `cp --sparse=always` of
# old.qcow2 unless said):
#   local-update            imgsync sync new.qcow2 DST (in-place qcow2 update,
#                           both ends in one process)
#   local-nochange          the same sync again on local-update's DST (its
#                           hash cache is valid: DST should not be read)
#   local-nochange-checksum the same with --checksum (DST read and hashed)
#   push-update             imgsync sync new.qcow2 ssh://127.0.0.1:PORT/DST
#                           (the server is the receiver)
#   pull-update             imgsync sync ssh://127.0.0.1:PORT/new.qcow2 DST
#                           (the client is the receiver)
#   create                  DST absent: imgsync sync new.qcow2 DST makes a qcow2
# Per row: wall time (the command then `sync -f DST`), peak RSS of the client
# (/usr/bin/time -f %M around the imgsync process itself) and, for ssh rows,
# of the server end (--remote-imgsync is a wrapper running the real
# `imgsync serve` under /usr/bin/time -o FILE), imgsync's --output json
# (bytes-read, blocks-sent, destination-hashes, clusters-allocated/-freed,
# metadata-bytes-written; bytes-read counts SRC's data read plus, on an
# update, the old content of each changed block read back from DST, not the
# reading of DST for its hashes), and correctness: `qemu-img compare new.qcow2 DST`
# and `qemu-img check DST` must both exit 0, else the row is a FAIL (the
# script goes on and exits 1 at the end). After local-update and create, DST's
# allocation is checked against the alloc bound above.
#
# SSH: a private sshd on 127.0.0.1 (free port, state in OUT_DIR/sshd: a
# generated host key, client key, authorized_keys, known_hosts), as
# tests/integration/sshd.rs does, started here and stopped (by its PID) at
# the end; not ../shared/bench's namespaces, so the link is loopback and
# unshaped (this benchmark is about memory, not the wire). imgsync's
# built-in client gets --known-hosts, -i, --ssh-config /dev/null and no
# ssh-agent. The binary is snapshotted to OUT_DIR/bin before measuring. 2
# cores shared by both ends; other load skews the wall times (load average
# printed per row).
#
#   bench/sync-big-qcow2.sh       # everything: ~1.5 min, + ~1-2.5 min to make the images
#   IMGSYNC=target/release/imgsync ROWS='^local' bench/sync-big-qcow2.sh
#   SIZE=4T bench/sync-big-qcow2.sh                       # more L2 tables
# Env:
#   SIZE=1T       virtual size (numfmt --from=iec)
#   NRUNS=2048    1 MiB runs of data in old.qcow2 (at distinct random 1 MiB slots)
#   NEW_RUNS=100  1 MiB runs written into former holes in new.qcow2
#   CHANGE_PCT=2  % of old's data rewritten in new (scattered 64 KiB blocks)
#   DISCARD_RUNS=16  whole runs dropped in new (plus 4 x as many single
#                 64 KiB blocks)
#   SEED=13
#   ROWS=.        regex on the row name (local-nochange* run local-update first)
#   DROP=0        1: sync + drop page caches before each row (warm by default:
#                 the point is memory, and other sessions share the machine)
#   IMGSYNC       binary to measure (default: cargo build --release, then
#                 target/release/imgsync); used on both ends
#   SYNC_ARGS     extra arguments to every `imgsync sync`
#   CAP=900       per-row time limit, s (a timed-out row is a FAIL)
#   RSS_GOAL_MIB=256
#   MALLOC_ENV    VAR=VALUE words set for imgsync on both ends, e.g.
#                 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536 (a fixed
#                 mmap threshold: freed cluster-sized buffers go back to the
#                 kernel, so RSS shows live memory rather than glibc's arenas)
#   IMG_DIR=/tmp/bench-data/big-qcow2/SIZE-NRUNS-seedSEED
#   OUT_DIR=/tmp/bench-data/sync-big-qcow2-out   (DSTs, logs, report.md)
#   KEEP=0        1: keep the DSTs in OUT_DIR/dst after the run
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SIZE=$(numfmt --from=iec "${SIZE:-1T}") || { echo "sync-big-qcow2.sh: bad SIZE" >&2; exit 2; }
NRUNS=${NRUNS:-2048}
NEW_RUNS=${NEW_RUNS:-100}
CHANGE_PCT=${CHANGE_PCT:-2}
DISCARD_RUNS=${DISCARD_RUNS:-16}
SEED=${SEED:-13}
ROWS=${ROWS:-.}
DROP=${DROP:-0}
SYNC_ARGS=${SYNC_ARGS:-}
CAP=${CAP:-900}
RSS_GOAL_MIB=${RSS_GOAL_MIB:-256}
MALLOC_ENV=${MALLOC_ENV:-}
KEEP=${KEEP:-0}
CLUSTER=65536
IMG_DIR=${IMG_DIR:-/tmp/bench-data/big-qcow2/$(numfmt --to=iec "$SIZE")-$NRUNS-seed$SEED}
OUT_DIR=${OUT_DIR:-/tmp/bench-data/sync-big-qcow2-out}

die() { echo "sync-big-qcow2.sh: $*" >&2; exit 2; }
say() { echo "$*" >&2; }

[ -x /usr/bin/time ] || apt-get install -y time >/dev/null || die "no /usr/bin/time"
command -v qemu-img >/dev/null || die "no qemu-img"
[ -x /usr/sbin/sshd ] || die "no /usr/sbin/sshd"
case $OUT_DIR in "$top"|"$top"/*) die "OUT_DIR must not be inside the repo" ;; esac
case $IMG_DIR in "$top"|"$top"/*) die "IMG_DIR must not be inside the repo" ;; esac

# ---------------------------------------------------------------- binary
if [ -z "${IMGSYNC:-}" ]; then
    cargo build --release --quiet --manifest-path "$top/Cargo.toml" || die "cargo build --release failed"
    IMGSYNC=$top/target/release/imgsync
fi
mkdir -p "$OUT_DIR/bin" "$OUT_DIR/logs" "$OUT_DIR/dst"
cp -f "$IMGSYNC" "$OUT_DIR/bin/imgsync.new" && mv -f "$OUT_DIR/bin/imgsync.new" "$OUT_DIR/bin/imgsync" ||
    die "cannot copy $IMGSYNC"
BIN=$OUT_DIR/bin/imgsync
SRV=$OUT_DIR/bin/imgsync-server
SRV_TIME=$OUT_DIR/server.time
cat >"$SRV" <<EOF
#!/bin/sh
# imgsync on the remote end, with its peak RSS (KiB) recorded for bench/sync-big-qcow2.sh
exec env $MALLOC_ENV /usr/bin/time -o $SRV_TIME -f '%M' $BIN "\$@"
EOF
chmod +x "$SRV"

# ---------------------------------------------------------------- images
OLD=$IMG_DIR/old.qcow2 NEW=$IMG_DIR/new.qcow2 REF=$IMG_DIR/ref.qcow2
params="size=$SIZE nruns=$NRUNS new_runs=$NEW_RUNS change_pct=$CHANGE_PCT discard_runs=$DISCARD_RUNS seed=$SEED cluster=$CLUSTER"
if [ ! -f "$REF" ] || [ "$(cat "$IMG_DIR/params" 2>/dev/null)" != "$params" ]; then
    say "== generating $IMG_DIR ($params)"
    t0=$(date +%s)
    mkdir -p "$IMG_DIR" && rm -f "$IMG_DIR"/*.raw "$OLD" "$NEW" "$REF" "$IMG_DIR/params" "$IMG_DIR/stats.txt"
    python3 - "$IMG_DIR" "$SIZE" "$NRUNS" "$NEW_RUNS" "$CHANGE_PCT" "$DISCARD_RUNS" "$SEED" <<'EOF' || die "image generation failed"
import os, random, sys
d, size, nruns, new_runs, pct, ndisc, seed = sys.argv[1], *map(int, sys.argv[2:])
RUN, BLK = 1 << 20, 64 << 10
rng = random.Random(seed)
pool = rng.randbytes(64 << 20)
def chunk(n):
    s = rng.randrange(0, len(pool) - n)
    return pool[s:s + n]
slots = size // RUN
assert nruns + new_runs + 1 <= slots, "SIZE too small for the runs"
taken = rng.sample(range(slots - 1), nruns + new_runs)
old_slots, new_slots = sorted(taken[:nruns]), taken[nruns:] + [slots - 1]
new_slots = sorted(new_slots)
old = {s: chunk(RUN) for s in old_slots}
new = dict(old)
# discards: whole runs, then single 64 KiB blocks of other runs
disc = set(rng.sample(old_slots, ndisc))
for s in disc:
    del new[s]
keep = [s for s in old_slots if s not in disc]
holes = 0
for s in rng.sample(keep, 4 * ndisc):
    b = rng.randrange(RUN // BLK)
    new[s] = new[s][:b * BLK] + bytes(BLK) + new[s][(b + 1) * BLK:]
    holes += 1
# rewrites: CHANGE_PCT % of old's data in scattered 64 KiB blocks
nchg = nruns * RUN * pct // 100 // BLK
changed = 0
for _ in range(nchg):
    s = rng.choice(keep)
    b = rng.randrange(RUN // BLK)
    new[s] = new[s][:b * BLK] + chunk(BLK) + new[s][(b + 1) * BLK:]
    changed += 1
for s in new_slots:
    new[s] = chunk(RUN)
for name, runs in (("old.raw", old), ("new.raw", new)):
    with open(os.path.join(d, name), "wb") as f:
        f.truncate(size)
        for s in sorted(runs):
            os.pwrite(f.fileno(), runs[s], s * RUN)
l2 = (65536 // 8) * 65536  # bytes one L2 table covers (64 KiB clusters)
l2_old = len({s * RUN // l2 for s in old_slots})
l2_new = len({s * RUN // l2 for s in new})
with open(os.path.join(d, "stats.txt"), "w") as f:
    f.write(f"old: {nruns} runs of 1 MiB over {size} bytes, touching {l2_old} L2 ranges of {l2 >> 20} MiB\n"
            f"new: {changed} x 64 KiB rewritten (<= {changed * BLK >> 20} MiB), {ndisc} runs discarded, "
            f"{holes} x 64 KiB made holes, {len(new_slots)} new 1 MiB runs in former holes; "
            f"{len(new)} runs, touching {l2_new} L2 ranges\n")
EOF
    for n in old new; do
        qemu-img convert -f raw -O qcow2 -o cluster_size=$CLUSTER "$IMG_DIR/$n.raw" "$IMG_DIR/$n.qcow2" ||
            die "qemu-img convert of $n.raw failed"
        rm -f "$IMG_DIR/$n.raw"
    done
    qemu-img convert -f qcow2 -O qcow2 -o cluster_size=$CLUSTER "$NEW" "$REF" || die "qemu-img convert of new.qcow2 failed"
    echo "generation took $(( $(date +%s) - t0 )) s" >>"$IMG_DIR/stats.txt"
    echo "$params" >"$IMG_DIR/params"
fi
cat "$IMG_DIR/stats.txt" >&2

# l2_tables FILE: number of allocated L2 tables (non-zero L1 entries) of a qcow2
l2_tables() {
    python3 - "$1" <<'EOF'
import struct, sys
with open(sys.argv[1], "rb") as f:
    h = f.read(48)
    l1_size, l1_off = struct.unpack(">IQ", h[36:48])
    f.seek(l1_off)
    l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
print(sum(1 for e in l1 if e & 0x00fffffffffffe00))
EOF
}
# data_bytes FILE: guest bytes that hold data (qemu-img map)
data_bytes() {
    qemu-img map -f qcow2 --output=json "$1" |
        python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}
alloc() { echo $(( $(stat -c %b "$1") * 512 )); }
SRC_DATA=$(data_bytes "$NEW")
REF_ALLOC=$(alloc "$REF")

# ---------------------------------------------------------------- sshd on 127.0.0.1
SD=$OUT_DIR/sshd SSHD_PID=
stop_sshd() {
    if [ -n "$SSHD_PID" ]; then kill "$SSHD_PID" 2>/dev/null; wait "$SSHD_PID" 2>/dev/null; SSHD_PID=; fi
}
trap stop_sshd EXIT
trap 'exit 130' INT TERM
start_sshd() {
    rm -rf "$SD"; mkdir -p "$SD"; chmod 700 "$SD"
    ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$SD/host_key" &&
        ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$SD/client_key" || die "ssh-keygen failed"
    cp "$SD/client_key.pub" "$SD/authorized_keys"
    [ -d /run/sshd ] || mkdir -m 755 /run/sshd   # left in place (others may use it)
    local try port
    for try in 1 2 3 4 5; do
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        cat >"$SD/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $SD/host_key
AuthorizedKeysFile $SD/authorized_keys
PidFile $SD/sshd.pid
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin yes
AllowUsers $(id -un)
LogLevel ERROR
EOF
        /usr/sbin/sshd -D -e -f "$SD/sshd_config" </dev/null >/dev/null 2>"$SD/sshd.log" &
        SSHD_PID=$!
        for _ in $(seq 150); do
            if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
                PORT=$port
                echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$SD/host_key.pub")" >"$SD/known_hosts"
                say "== sshd on 127.0.0.1:$PORT (pid $SSHD_PID)"
                return 0
            fi
            kill -0 "$SSHD_PID" 2>/dev/null || break
            sleep 0.1
        done
        stop_sshd
    done
    die "sshd did not start: $(tail -n 3 "$SD/sshd.log")"
}

# ---------------------------------------------------------------- rows
declare -A WALL CRSS SRSS RES NOTE JBR JBS JDH JCA JCF JMW
ORDER=()
FAILED=0
drop_caches() { sync; if [ "$DROP" != 0 ]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get(sys.argv[2], ""))' "$1" "$2" 2>/dev/null; }
mib() { case $1 in ''|-|\?) echo "${1:--}" ;; *) awk -v b="$1" 'BEGIN{printf "%.1f", b / 1048576}' ;; esac; }
kib_mib() { case $1 in ''|-|\?) echo "${1:--}" ;; *) awk -v k="$1" 'BEGIN{printf "%.1f", k / 1024}' ;; esac; }
fl() { awk "BEGIN{exit !($*)}"; }

# run_row NAME SEED(copy|keep|none) WHERE(local|ssh) DST CMD...: one timed run.
run_row() {
    local name=$1 seed=$2 where=$3 dst=$4; shift 4
    local json=$OUT_DIR/logs/$name.json log=$OUT_DIR/logs/$name.log ctime=$OUT_DIR/client.time
    local t0 t1 rc out load cr sr=-
    ORDER+=("$name") RES[$name]=FAIL NOTE[$name]= WALL[$name]=- CRSS[$name]=- SRSS[$name]=-
    case $seed in
        copy) rm -f "$dst" "$(dirname "$dst")/.$(basename "$dst").imgsync-hashes"
              cp --sparse=always "$OLD" "$dst" || die "seeding $dst failed" ;;
        none) rm -f "$dst" "$(dirname "$dst")/.$(basename "$dst").imgsync-hashes" ;;
        keep) [ -f "$dst" ] || { NOTE[$name]="no DST from the row before"; FAILED=1; say "-- $name: FAIL ${NOTE[$name]}"; return; } ;;
    esac
    rm -f "$json" "$SRV_TIME" "$ctime"
    drop_caches
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$(date +%s%N)
    timeout -k 10 "$CAP" /usr/bin/time -o "$ctime" -f '%M' "$@" >"$json" 2>"$log" </dev/null
    rc=$?
    [ -e "$dst" ] && sync -f "$dst"
    t1=$(date +%s%N)
    WALL[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b - a) / 1e9}')
    cr=$(tail -n 1 "$ctime" 2>/dev/null) CRSS[$name]=${cr:-?}
    if [ "$where" = ssh ]; then sr=$(tail -n 1 "$SRV_TIME" 2>/dev/null); SRSS[$name]=${sr:-?}; fi
    if [ "$rc" != 0 ]; then
        NOTE[$name]="rc=$rc$([ "$rc" = 124 ] && echo " (timeout ${CAP}s)"): $(tail -n 3 "$log" | tr '\n\t' '  ' | cut -c1-300)"
    elif ! out=$(qemu-img compare -f qcow2 -F qcow2 "$NEW" "$dst" 2>&1); then
        NOTE[$name]="qemu-img compare: $(echo "$out" | head -n 1)"
    elif ! out=$(qemu-img check -f qcow2 "$dst" 2>&1); then
        NOTE[$name]="qemu-img check: $(echo "$out" | grep -v '^$' | tail -n 2 | tr '\n' ' ')"
    else
        RES[$name]=ok
    fi
    if [ -s "$json" ]; then
        JBR[$name]=$(jget "$json" bytes-read) JBS[$name]=$(jget "$json" blocks-sent)
        JDH[$name]=$(jget "$json" destination-hashes) JCA[$name]=$(jget "$json" clusters-allocated)
        JCF[$name]=$(jget "$json" clusters-freed) JMW[$name]=$(jget "$json" metadata-bytes-written)
    fi
    [ "${RES[$name]}" = ok ] || FAILED=1
    say "$(printf -- '-- %-24s %8ss rss client %s KiB server %s KiB, bytes-read %s MiB, blocks-sent %s, dst hashes %s, load %s: %s %s' \
        "$name" "${WALL[$name]}" "${CRSS[$name]}" "${SRSS[$name]}" "$(mib "${JBR[$name]:-}")" "${JBS[$name]:--}" \
        "${JDH[$name]:--}" "$load" "${RES[$name]}" "${NOTE[$name]}")"
}

# alloc_check NAME DST: DST's allocation against ref.qcow2's + 5 % + one cluster per L2 table.
declare -A ALLOC
alloc_check() {
    local name=$1 dst=$2 a l2 bound r
    [ "${RES[$name]}" = ok ] || { ALLOC[$name]="- (row failed)"; return; }
    a=$(alloc "$dst") l2=$(l2_tables "$dst")
    bound=$(awk -v r="$REF_ALLOC" -v l="$l2" -v c="$CLUSTER" 'BEGIN{printf "%.0f", 1.05 * r + l * c}')
    if [ "$a" -le "$bound" ]; then r=PASS; else r=FAIL; FAILED=1; RES[$name]=FAIL; fi
    ALLOC[$name]="$(mib "$a") MiB vs <= $(mib "$bound") MiB (ref $(mib "$REF_ALLOC") MiB x 1.05 + $l2 L2 tables x 64 KiB; ratio $(awk -v a="$a" -v r="$REF_ALLOC" 'BEGIN{printf "%.3f", a / r}')): **$r**"
    NOTE[$name]="${NOTE[$name]:+${NOTE[$name]}; }alloc $r"
    say "   $name allocation: ${ALLOC[$name]}"
}

# want ROW: whether ROW's name matches ROWS
want() { [[ "$1" =~ $ROWS ]]; }
REPORT=$OUT_DIR/report.md
D=$OUT_DIR/dst
{
    echo "## bench/sync-big-qcow2.sh $(date -Is)"
    echo
    echo "imgsync $("$BIN" --version 2>/dev/null | awk '{print $2}') (git $(git -C "$top" rev-parse --short HEAD 2>/dev/null)$(git -C "$top" diff --quiet HEAD -- src 2>/dev/null || echo '+uncommitted src'))${SYNC_ARGS:+ sync $SYNC_ARGS}${MALLOC_ENV:+; env $MALLOC_ENV}; $(qemu-img --version | head -n 1 | awk '{print "qemu-img", $3}'); $(nproc) cores; page cache $([ "$DROP" != 0 ] && echo dropped || echo warm)."
    echo "SRC new.qcow2: $(numfmt --to=iec "$SIZE") virtual, $(mib "$SRC_DATA") MiB data, $(l2_tables "$NEW") L2 tables; old.qcow2: $(mib "$(data_bytes "$OLD")") MiB data, $(l2_tables "$OLD") L2 tables; ref.qcow2 (qemu-img convert of new): $(mib "$REF_ALLOC") MiB allocated."
    sed 's/^/    /' "$IMG_DIR/stats.txt"
    echo "wall includes 'sync -f DST'; RSS client = the imgsync process the command runs (local rows: both ends), server = imgsync serve under sshd on 127.0.0.1 (sshd not included)."
} | tee "$REPORT"

if want push-update || want pull-update; then start_sshd; fi
URL="ssh://127.0.0.1:${PORT:-0}"
SSHOPT=(--known-hosts "$SD/known_hosts" -i "$SD/client_key" --ssh-config /dev/null --remote-imgsync "$SRV")
# shellcheck disable=SC2086
SY=(env -u SSH_AUTH_SOCK $MALLOC_ENV "$BIN" sync -q --output json $SYNC_ARGS)

if want local-update || want local-nochange || want local-nochange-checksum; then
    run_row local-update copy local "$D/local.qcow2" "${SY[@]}" "$NEW" "$D/local.qcow2"
    alloc_check local-update "$D/local.qcow2"
    [ -f "$D/.local.qcow2.imgsync-hashes" ] &&
        NOTE[local-update]="${NOTE[local-update]}; hash cache $(mib "$(stat -c %s "$D/.local.qcow2.imgsync-hashes")") MiB"
fi
if want local-nochange; then
    run_row local-nochange keep local "$D/local.qcow2" "${SY[@]}" "$NEW" "$D/local.qcow2"
fi
if want local-nochange-checksum; then
    run_row local-nochange-checksum keep local "$D/local.qcow2" "${SY[@]}" --checksum "$NEW" "$D/local.qcow2"
fi
[ "$KEEP" = 0 ] && rm -f "$D/local.qcow2" "$D/.local.qcow2.imgsync-hashes"
if want push-update; then
    run_row push-update copy ssh "$D/push.qcow2" "${SY[@]}" "${SSHOPT[@]}" "$NEW" "$URL$D/push.qcow2"
    [ "$KEEP" = 0 ] && rm -f "$D/push.qcow2" "$D/.push.qcow2.imgsync-hashes"
fi
if want pull-update; then
    run_row pull-update copy ssh "$D/pull.qcow2" "${SY[@]}" "${SSHOPT[@]}" "$URL$NEW" "$D/pull.qcow2"
    [ "$KEEP" = 0 ] && rm -f "$D/pull.qcow2" "$D/.pull.qcow2.imgsync-hashes"
fi
stop_sshd
if want create; then
    run_row create none local "$D/create.qcow2" "${SY[@]}" "$NEW" "$D/create.qcow2"
    alloc_check create "$D/create.qcow2"
    if [ -n "${JBR[create]:-}" ]; then
        NOTE[create]="${NOTE[create]}; bytes-read / SRC data = $(awk -v a="${JBR[create]}" -v d="$SRC_DATA" 'BEGIN{printf "%.3f", a / d}')"
    fi
    [ "$KEEP" = 0 ] && rm -f "$D/create.qcow2" "$D/.create.qcow2.imgsync-hashes"
fi

# ---------------------------------------------------------------- table + goals
GOAL_KIB=$((RSS_GOAL_MIB * 1024))
max_c=0 max_s=0 rss_ok=PASS
for n in "${ORDER[@]}"; do
    for v in "${CRSS[$n]}" "${SRSS[$n]}"; do
        case $v in
            -) ;;
            ''|\?) rss_ok=FAIL ;;
            *) if fl "$v > $GOAL_KIB"; then rss_ok=FAIL NOTE[$n]="${NOTE[$n]:+${NOTE[$n]}; }RSS over $RSS_GOAL_MIB MiB"; fi ;;
        esac
    done
    case ${CRSS[$n]} in ''|-|\?) ;; *) [ "${CRSS[$n]}" -gt "$max_c" ] && max_c=${CRSS[$n]} ;; esac
    case ${SRSS[$n]} in ''|-|\?) ;; *) [ "${SRSS[$n]}" -gt "$max_s" ] && max_s=${SRSS[$n]} ;; esac
done
[ "$rss_ok" = PASS ] || FAILED=1
{
    echo
    echo "| row | wall s | client RSS MiB | server RSS MiB | bytes-read MiB | blocks-sent | DST hashes | clusters alloc/freed | metadata written MiB | result | note |"
    echo "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|"
    for n in "${ORDER[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$n" "${WALL[$n]}" \
            "$(kib_mib "${CRSS[$n]}")" "$(kib_mib "${SRSS[$n]}")" "$(mib "${JBR[$n]:-}")" "${JBS[$n]:--}" \
            "${JDH[$n]:--}" "${JCA[$n]:--}/${JCF[$n]:--}" "$(mib "${JMW[$n]:-}")" \
            "${RES[$n]}" "${NOTE[$n]//|/\\|}"
    done
    echo
    echo "Goals:"
    echo "- RSS <= $RSS_GOAL_MIB MiB on both ends: max client $(kib_mib "${max_c/#0/-}") MiB, max server $(kib_mib "${max_s/#0/-}") MiB: **$rss_ok**"
    for n in local-update create; do
        [ -n "${ALLOC[$n]:-}" ] && echo "- $n DST allocation: ${ALLOC[$n]}"
    done
    echo
} | tee -a "$REPORT"
echo "report: $REPORT; logs: $OUT_DIR/logs" >&2
[ "$FAILED" = 0 ] || { echo "FAIL: some rows or goals failed (see above)" | tee -a "$REPORT"; exit 1; }
