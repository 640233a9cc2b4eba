#!/usr/bin/env bash
# Benchmark (issue 5): delta sync in place with `imgsync sync` vs rsync, at
# one link rate (1gbit by default), plus a no-change sync. Images from
# ../shared/bench/mkimages.sh: disk.raw (16 GiB virtual, 1.5 GiB allocated)
# and disk-changed.raw (2 % of the data rewritten + ~100 MiB new in former
# holes). Link: the harness's namespaces isrc -> idst (veth shaped with tc
# tbf, sshd in idst at 10.99.0.2, ../shared/bench/netns.sh); both namespaces
# share the filesystem. Structure, timing and report style of bench/remote.sh.
#
# Rows (the remote file is DST; "old" = DST seeded with disk.raw, untimed, by
# the harness's allocation-preserving copy `mkimage.py copy` + touch -r, as
# run-anchors.sh does for its delta scenario):
#   imgsync-sync       built-in SSH client: imgsync sync disk-changed.raw ssh://root@10.99.0.2DST (old)
#   imgsync-sync-ext   -e "ssh -F /tmp/bench-ssh/ssh_config" ... dst:DST (old)
#   rsync-sparse-inplace-nowhole  rsync -a --sparse --inplace --no-whole-file (old)
#   rsync-sparse       rsync -a --sparse (old)  (peer lines exactly as tools.sh's delta rows)
#   imgsync-sync-cached  as imgsync-sync, DST seeded by an (untimed) imgsync sync
#                      of disk.raw, as after last night's sync: DST's hash
#                      cache is valid, so DST is not read
#   imgsync-nochange   built-in client: imgsync sync disk.raw onto DST = disk.raw
#                      seeded by imgsync sync (the nightly case: nothing changed)
#   imgsync-nochange-checksum   the same with --checksum (DST read and hashed)
#   read-src           reference: readalloc.py disk.raw (reads only the
#                      allocated extents; the harness's physical-limit reference)
#   imgsync-sync-local, imgsync-nochange-local   (info, no goal) the same
#                      syncs without network, SRC and DST on this host
# Per row: wall time, wire bytes (veth counters of vsrc, both directions, via
# wire.sh), peak RSS and user+sys CPU of the client (/usr/bin/time around the
# whole client command, children included) and, for imgsync over ssh, of the
# server (--remote-imgsync is a wrapper running the real `imgsync serve` under
# /usr/bin/time), imgsync's --output json (blocks-sent, data-sent,
# wire-bytes, journal-bytes), and correctness: `qemu-img compare SRC DST` must
# exit 0, else the row is a FAIL (the script goes on and exits 1 at the end).
# Files left in DST's folder besides DST and its hash cache (e.g. a journal)
# are noted.
#
# Fairness: every command is timed as CMD; then `sync -f DST` (in the
# destination namespace for remote rows), both inside the timed region. The
# page cache is dropped before every run (DROP=0 skips it), after seeding.
# imgsync's built-in client gets explicit --known-hosts (a scratch file made
# from the bench host key), -i and --ssh-config /dev/null and no ssh-agent.
# The binary is snapshotted to OUT_DIR/bin before measuring. 2 cores shared
# by both ends; other load skews everything (load average printed per run).
#
# Goals (issue 5):
#   wire      imgsync-sync*: wire <= 1.2 x zstd(changed data) + 0.5 % of the data,
#             zstd(changed data) = `zstd -1 -c | wc -c` of the content (in SRC)
#             of the BS blocks that differ between disk.raw and
#             disk-changed.raw (found by reading the allocated extents of
#             both, cached in OUT_DIR/changed.env); the data = du -B1 of SRC
#   wall      imgsync-sync*: wall <= 0.3 x the faster rsync row
#   nochange  imgsync-nochange: wall <= 1.1 x read-src (reading SRC's data)
#
# The namespaces are brought up (netns.sh up) if down and taken down again at
# the end; if they were up, the original RATE is restored at the end.
# Outputs (destinations, logs, report.md) go to OUT_DIR, never into the repo.
#
#   bench/sync.sh                                     # everything, ~6 min
#   ROWS='^imgsync-sync$|^rsync-sparse$' bench/sync.sh
#   RUNS=3 DROP=0 IMGSYNC=/path/to/imgsync bench/sync.sh
#   PERF=1 ROWS='^imgsync-sync$' bench/sync.sh        # + perf record of both ends
# Env:
#   RATE=1gbit    tc rate
#   ROWS=.        regex on the row name
#   RUNS=1        runs per row, the best (lowest wall) is kept
#   DROP=1        sync + drop page caches before each run (0: warm cache)
#   BS=65536      block size of the changed-data computation (= imgsync's default)
#   IMGSYNC       binary to measure (default: cargo build --release, then
#                 target/release/imgsync); used on both ends
#   SYNC_ARGS     extra arguments to every `imgsync sync` (e.g. --no-journal)
#   CAP=600       per-run time limit, s (a timed-out run is a FAIL)
#   PERF=0        1: perf record (PERF_ARGS, default "-F 999 -g") of the
#                 imgsync client and server into OUT_DIR/logs/ROW.{client,server}.perf
#   QCOW2=0       1: the images as qcow2 (issue 13): SRC = disk-changed.raw
#                 converted by qemu-img, DST seeded with disk.raw converted by
#                 qemu-img (a plain file copy of it, cp --sparse=always; for
#                 the rows seeded by imgsync, then an untimed imgsync sync of
#                 disk's qcow2 onto it, which leaves DST's hash cache), so
#                 imgsync updates a qcow2 DST in place and rsync syncs the
#                 qcow2 files' bytes; compare as qcow2. The changed-data goal
#                 is still computed on the raw images (the guest content).
#   IMG_DIR=/tmp/bench-data/images   OUT_DIR=/tmp/bench-data/sync-out
#   VERBOSE=0     1: print every command line too
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$(cd "$top/../shared/bench" && pwd)}
IMG_DIR=${IMG_DIR:-/tmp/bench-data/images}
OUT_DIR=${OUT_DIR:-/tmp/bench-data/sync-out}
RATE=${RATE:-1gbit}
ROWS=${ROWS:-.}
RUNS=${RUNS:-1}
DROP=${DROP:-1}
BS=${BS:-65536}
SYNC_ARGS=${SYNC_ARGS:-}
CAP=${CAP:-600}
PERF=${PERF:-0}
PERF_ARGS=${PERF_ARGS:--F 999 -g}
VERBOSE=${VERBOSE:-0}
S=/tmp/bench-ssh
RIP=10.99.0.2
GOAL_WIRE_X=1.2 GOAL_WIRE_DATA=0.005 GOAL_WALL=0.3 GOAL_NOCHANGE=1.1

die() { echo "sync.sh: $*" >&2; exit 2; }
say() { echo "$*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (namespaces, drop_caches)"
[ -x /usr/bin/time ] || apt-get install -y time >/dev/null || die "no /usr/bin/time"
command -v zstd >/dev/null || die "no zstd"
source "$SHARED/wire.sh"

# ---------------------------------------------------------------- binary
if [ -z "${IMGSYNC:-}" ]; then
    cargo build --release --quiet --manifest-path "$top/Cargo.toml" || die "cargo build --release failed"
    IMGSYNC=$top/target/release/imgsync
fi
mkdir -p "$OUT_DIR/bin" "$OUT_DIR/logs"
cp -f "$IMGSYNC" "$OUT_DIR/bin/imgsync.new" && mv -f "$OUT_DIR/bin/imgsync.new" "$OUT_DIR/bin/imgsync" ||
    die "cannot copy $IMGSYNC"
BIN=$OUT_DIR/bin/imgsync
SRV=$OUT_DIR/bin/imgsync-server
SRV_TIME=$OUT_DIR/server.time
CUR=$OUT_DIR/current-row
if [ "$PERF" != 0 ]; then
    cat >"$SRV" <<EOF
#!/bin/sh
# imgsync on the remote end under perf record, for bench/sync.sh (PERF=1)
exec /usr/bin/time -o $SRV_TIME -f '%M %U %S' perf record -q $PERF_ARGS -o $OUT_DIR/logs/\$(cat $CUR).server.perf -- $BIN "\$@"
EOF
else
    cat >"$SRV" <<EOF
#!/bin/sh
# imgsync on the remote end, with its peak RSS and CPU recorded for bench/sync.sh
exec /usr/bin/time -o $SRV_TIME -f '%M %U %S' $BIN "\$@"
EOF
fi
chmod +x "$SRV"

# ---------------------------------------------------------------- images
if [ ! -f "$IMG_DIR/disk.raw" ] || [ ! -f "$IMG_DIR/disk-changed.raw" ]; then
    say "== generating $IMG_DIR (mkimages.sh, ~50 s)"
    "$SHARED/mkimages.sh" "$IMG_DIR" >&2 || die "mkimages.sh failed"
fi
RAW=$IMG_DIR/disk.raw CHANGED=$IMG_DIR/disk-changed.raw
SRC_DATA=$(du -B1 "$CHANGED" | cut -f1)
QCOW2=${QCOW2:-0}
EXT=raw FMT=raw
if [ "$QCOW2" != 0 ]; then
    for n in disk disk-changed; do
        q=$IMG_DIR/$n.bench.qcow2
        if [ ! -f "$q" ] || [ "$q" -ot "$IMG_DIR/$n.raw" ]; then
            say "== $q (qemu-img convert -O qcow2)"
            qemu-img convert -f raw -O qcow2 "$IMG_DIR/$n.raw" "$q.tmp" && mv "$q.tmp" "$q" ||
                die "qemu-img convert of $n.raw failed"
        fi
    done
    EXT=qcow2 FMT=qcow2
fi

# The changed data: the BS blocks whose content differs between disk.raw and
# disk-changed.raw (reading only the allocated extents of either), their SRC
# content compressed with zstd -1. Cached per (image stats, BS).
CH_ENV=$OUT_DIR/changed.env
ch_key="$(stat -c '%s %Y %i' "$RAW" "$CHANGED" | tr '\n' ' ')bs=$BS"
if [ ! -s "$CH_ENV" ] || [ "$(sed -n 's/^# key: //p' "$CH_ENV")" != "$ch_key" ]; then
    say "== changed data: comparing the allocated extents of disk.raw and disk-changed.raw in $BS-byte blocks"
    tmpf=$OUT_DIR/changed-blocks.bin
    vars=$(python3 - "$CHANGED" "$RAW" "$BS" "$tmpf" <<'EOF'
import os, sys
src, old, bs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def extents(fd):
    size, off, r = os.fstat(fd).st_size, 0, []
    while off < size:
        try:
            off = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, off, os.SEEK_HOLE)
        r.append((off // bs, (end + bs - 1) // bs))
        off = end
    return r
fs, fo = os.open(src, os.O_RDONLY), os.open(old, os.O_RDONLY)
runs = []
for s, e in sorted(extents(fs) + extents(fo)):
    if runs and s <= runs[-1][1]:
        runs[-1][1] = max(runs[-1][1], e)
    else:
        runs.append([s, e])
zero = bytes(bs)
compared = changed = punched = 0
with open(out, "wb") as o:
    for s, e in runs:
        b = s
        while b < e:
            k = min(e - b, 256)
            A = os.pread(fs, k * bs, b * bs).ljust(k * bs, b"\0")
            B = os.pread(fo, k * bs, b * bs).ljust(k * bs, b"\0")
            compared += k
            if A != B:
                for i in range(k):
                    x = A[i * bs:(i + 1) * bs]
                    if x != B[i * bs:(i + 1) * bs]:
                        if x == zero:
                            punched += 1
                        else:
                            changed += 1
                            o.write(x)
            b += k
print(f"CH_COMPARED={compared} CH_BLOCKS={changed} CH_ZERO={punched} CH_BYTES={changed * bs}")
EOF
    ) || die "changed-data computation failed"
    z=$(zstd -q -1 -c "$tmpf" | wc -c)
    rm -f "$tmpf"
    { echo "# key: $ch_key"; echo "$vars CH_ZSTD=$z"; } >"$CH_ENV"
fi
eval "$(grep -v '^#' "$CH_ENV")"
GOAL_WIRE_BYTES=$(awk -v z="$CH_ZSTD" -v d="$SRC_DATA" -v x="$GOAL_WIRE_X" -v f="$GOAL_WIRE_DATA" 'BEGIN{printf "%.0f", x * z + f * d}')

# ---------------------------------------------------------------- network
source "$top/bench/netns-take.sh"
netns_take "$RATE"

# ---------------------------------------------------------------- rows
export BIN SRV KH SSH SSHCFG RIP S SYNC_ARGS SHARED
export ID=$S/id_ed25519
# PC: the client's command prefix (perf record with PERF=1)
PC=
# lines "name<TAB>kind<TAB>src<TAB>where<TAB>command[<TAB>seed]"
#   kind imgsync|peer|ref|info; src changed|raw; where src (namespace isrc,
#   DST seeded with disk.raw, remote) | local (host, DST seeded) | ref (host, no DST);
#   seed copy (default: allocation-preserving copy) | imgsync (imgsync sync
#   disk.raw DST on the host, leaving DST's hash cache)
rows() {
    local bi="env -u SSH_AUTH_SOCK \$PC \"\$BIN\" sync -q --output json \$SYNC_ARGS --known-hosts \"\$KH\" -i \"\$ID\" --ssh-config /dev/null --remote-imgsync \"\$SRV\" \"\$SRC\" \"ssh://root@\$RIP\$DST\" >\"\$JSON\""
    local lo="\$PC \"\$BIN\" sync -q --output json \$SYNC_ARGS \"\$SRC\" \"\$DST\" >\"\$JSON\""
    printf 'imgsync-sync\timgsync\tchanged\tsrc\t%s\n' "$bi"
    printf 'imgsync-sync-ext\timgsync\tchanged\tsrc\t%s\n' \
        "\$PC \"\$BIN\" sync -q --output json \$SYNC_ARGS -e \"\$SSH\" --remote-imgsync \"\$SRV\" \"\$SRC\" \"dst:\$DST\" >\"\$JSON\""
    printf 'rsync-sparse-inplace-nowhole\tpeer\tchanged\tsrc\t%s\n' \
        "rsync -a --sparse --inplace --no-whole-file -e \"\$SSH\" \"\$SRC\" \"dst:\$DST\""
    printf 'rsync-sparse\tpeer\tchanged\tsrc\t%s\n' \
        "rsync -a --sparse -e \"\$SSH\" \"\$SRC\" \"dst:\$DST\""
    printf 'imgsync-sync-cached\timgsync\tchanged\tsrc\t%s\timgsync\n' "$bi"
    printf 'imgsync-nochange\timgsync\traw\tsrc\t%s\timgsync\n' "$bi"
    printf 'imgsync-nochange-checksum\tinfo\traw\tsrc\t%s\timgsync\n' "${bi/sync -q/sync -q --checksum}"
    printf 'read-src\tref\traw\tref\t%s\n' "python3 \"\$SHARED/readalloc.py\" \"\$SRC\""
    printf 'imgsync-sync-local\tinfo\tchanged\tlocal\t%s\n' "$lo"
    printf 'imgsync-nochange-local\tinfo\traw\tlocal\t%s\n' "$lo"
}

# ---------------------------------------------------------------- measuring
declare -A WALL WIRE CRSS SRSS CCPU SCPU OKS NOTE KIND SRCOF JBS JDS JWB JJB JSEC
ORDER=()
FAILED=0
drop_caches() { sync; if [ "$DROP" != 0 ]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
fl() { awk "BEGIN{exit !($*)}"; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get(sys.argv[2], ""))' "$1" "$2" 2>/dev/null; }
cpu() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", a + b}'; }

# run_row NAME KIND SRCKIND WHERE CMD: RUNS runs, keep the best correct one.
run_row() {
    local name=$1 kind=$2 srck=$3 where=$4 cmd=$5 seed=${6:-copy}
    local dstdir=$OUT_DIR/dst/$name run log ctime rc t0 t1 a0 b0 a1 b1 wall wire ok out left
    export DST=$dstdir/disk.$EXT JSON=$OUT_DIR/logs/$name.json
    if [ "$srck" = changed ]; then export SRC=$CHANGED; else export SRC=$RAW; fi
    if [ "$QCOW2" != 0 ]; then
        if [ "$srck" = changed ]; then SRC=$IMG_DIR/disk-changed.bench.qcow2; else SRC=$IMG_DIR/disk.bench.qcow2; fi
        export SRC
    fi
    ORDER+=("$name") KIND[$name]=$kind SRCOF[$name]=$srck OKS[$name]=FAIL NOTE[$name]=
    echo "$name" >"$CUR"
    if [ "$PERF" != 0 ] && [ "$kind" != peer ] && [ "$kind" != ref ]; then
        PC="perf record -q $PERF_ARGS -o $OUT_DIR/logs/$name.client.perf --"
    else PC=; fi
    export PC
    for run in $(seq "$RUNS"); do
        log=$OUT_DIR/logs/$name-run$run.log ctime=$OUT_DIR/client.time
        rm -rf "$dstdir"; mkdir -p "$dstdir"
        rm -f "$JSON" "$SRV_TIME" "$ctime"
        if [ "$where" != ref ] && [ "$seed" = imgsync ] && [ "$QCOW2" != 0 ]; then
            # As after last night's sync: the qcow2 DST, then an imgsync
            # sync of disk's qcow2 onto it (nothing to change) leaves its
            # hash cache.
            cp --sparse=always "$IMG_DIR/disk.bench.qcow2" "$DST" &&
                "$BIN" sync -q "$IMG_DIR/disk.bench.qcow2" "$DST" || die "seeding $DST failed"
        elif [ "$where" != ref ] && [ "$seed" = imgsync ]; then
            "$BIN" sync -q "$RAW" "$DST" || die "seeding $DST (imgsync sync) failed"
        elif [ "$where" != ref ] && [ "$QCOW2" != 0 ]; then
            cp --sparse=always "$IMG_DIR/disk.bench.qcow2" "$DST" &&
                touch -r "$IMG_DIR/disk.bench.qcow2" "$DST" || die "seeding $DST failed"
        elif [ "$where" != ref ]; then
            python3 "$SHARED/mkimage.py" copy "$RAW" "$DST" && touch -r "$RAW" "$DST" ||
                die "seeding $DST failed"
        fi
        drop_caches
        [ "$VERBOSE" != 0 ] && say "   \$ $cmd"
        local load; load=$(cut -d' ' -f1 /proc/loadavg)
        read -r a0 b0 < <(wire_snap)
        t0=$(date +%s%N)
        if [ "$where" = src ]; then
            timeout -k 10 "$CAP" /usr/bin/time -o "$ctime" -f '%M %U %S' \
                ip netns exec isrc bash -c "$cmd" >"$log" 2>&1 </dev/null
            rc=$?
            [ -e "$DST" ] && ip netns exec idst sync -f "$DST"
        else
            timeout -k 10 "$CAP" /usr/bin/time -o "$ctime" -f '%M %U %S' \
                bash -c "$cmd" >"$log" 2>&1 </dev/null
            rc=$?
            [ "$where" = local ] && [ -e "$DST" ] && sync -f "$DST"
        fi
        t1=$(date +%s%N)
        read -r a1 b1 < <(wire_snap)
        wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b - a) / 1e9}')
        wire=$((a1 - a0 + b1 - b0))
        if [ "$rc" != 0 ]; then
            NOTE[$name]="rc=$rc$([ "$rc" = 124 ] && echo " (timeout ${CAP}s)"): $(tail -n 3 "$log" | tr '\n\t' '  ' | cut -c1-300)"
            say "-- $name run $run: ${wall}s FAILED ${NOTE[$name]}"
            FAILED=1
            break
        fi
        ok=ok
        if [ "$where" != ref ]; then
            if ! out=$(qemu-img compare -f "$FMT" -F "$FMT" "$SRC" "$DST" 2>&1); then
                ok=FAIL FAILED=1
                NOTE[$name]="qemu-img compare: $(echo "$out" | head -n 1)"
            fi
            left=$(cd "$dstdir" && ls -A | grep -vx -e "disk.$EXT" -e ".disk.$EXT.imgsync-hashes" | tr '\n' ' ')
        else
            left=
            NOTE[$name]=$(tail -n 1 "$log")
        fi
        local cr cu cs sr=- su=0 ss=0 scpu=-
        read -r cr cu cs < <(tail -n 1 "$ctime")
        if [ "$kind" = imgsync ] && [ "$where" = src ]; then
            if [ -s "$SRV_TIME" ]; then read -r sr su ss < <(tail -n 1 "$SRV_TIME"); scpu=$(cpu "$su" "$ss"); else sr=?; fi
        fi
        say "$(printf -- '-- %-28s run %d: %8ss wire %8.1f MiB rss %s/%s KiB cpu %s/%s s load %s %s%s' \
            "$name" "$run" "$wall" "$(mib "$wire")" "$cr" "$sr" "$(cpu "$cu" "$cs")" "$scpu" "$load" "$ok" \
            "${left:+ (left in DST dir: $left)}")"
        if [ "$ok" = ok ] && { [ "${OKS[$name]}" != ok ] || fl "$wall < ${WALL[$name]}"; }; then
            WALL[$name]=$wall WIRE[$name]=$wire OKS[$name]=ok CRSS[$name]=$cr SRSS[$name]=$sr
            CCPU[$name]=$(cpu "$cu" "$cs") SCPU[$name]=$scpu
            [ -n "$left" ] && NOTE[$name]="left in DST dir: $left"
            if [ -s "$JSON" ]; then
                JBS[$name]=$(jget "$JSON" blocks-sent) JDS[$name]=$(jget "$JSON" data-sent)
                JWB[$name]=$(jget "$JSON" wire-bytes) JJB[$name]=$(jget "$JSON" journal-bytes)
                JSEC[$name]=$(jget "$JSON" seconds)
                cp -f "$JSON" "$OUT_DIR/logs/$name.best.json"
            fi
        elif [ "$ok" != ok ]; then
            say "   FAIL: ${NOTE[$name]}"
            break
        fi
    done
    rm -rf "$dstdir"
}

mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b / 1048576}'; }
mibo() { case $1 in ''|-|\?) echo "${1:--}" ;; *) mib "$1" ;; esac; }
kib_mib() { case $1 in ''|-|\?) echo "${1:--}" ;; *) awk -v k="$1" 'BEGIN{printf "%.0f", k / 1024}' ;; esac; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "-" }'; }
pm() { if fl "$1"; then echo PASS; else echo MISS; fi; }

REPORT=$OUT_DIR/report.md
{
    echo "## bench/sync.sh $(date -Is)"
    echo
    echo "imgsync $("$BIN" --version 2>/dev/null | awk '{print $2}') (git $(git -C "$top" rev-parse --short HEAD 2>/dev/null)$(git -C "$top" diff --quiet HEAD -- src 2>/dev/null || echo '+uncommitted src'))${SYNC_ARGS:+ sync $SYNC_ARGS}; $(rsync --version | head -n 1 | awk '{print "rsync", $3}'); $(ssh -V 2>&1); $(nproc) cores; RATE=$RATE; RUNS=$RUNS (best kept); page cache $([ "$DROP" != 0 ] && echo dropped || echo warm)."
    echo "SRC disk-changed.raw: $(mib "$SRC_DATA") MiB data (du -B1); vs disk.raw: $CH_BLOCKS of $CH_COMPARED allocated $BS-byte blocks differ ($(mib "$CH_BYTES") MiB, zstd -1: $(mib "$CH_ZSTD") MiB; $CH_ZERO became zero)."
    echo "wall includes 'sync -f DST' (in the destination namespace); wire = both directions on the veth; RSS/CPU client = the whole client command with children (ssh included), server = imgsync serve only (sshd not included); DST seeded untimed with an allocation-preserving copy of disk.raw."
} | tee "$REPORT"

while IFS=$'\t' read -r -u 3 name kind srck where cmd seed; do
    [[ "$name" =~ $ROWS ]] || continue
    run_row "$name" "$kind" "$srck" "$where" "$cmd" "$seed"
done 3< <(rows)

# ---------------------------------------------------------------- goals + table
best_rsync= best_rsync_name=
for n in "${ORDER[@]}"; do
    [[ ${KIND[$n]} == peer && ${OKS[$n]} == ok ]] || continue
    if [ -z "$best_rsync" ] || fl "${WALL[$n]} < $best_rsync"; then best_rsync=${WALL[$n]} best_rsync_name=$n; fi
done
read_ref=
[ "${OKS[read-src]:-}" = ok ] && read_ref=${WALL[read-src]}
declare -A GOALS
GOAL_LINES=()
for n in "${ORDER[@]}"; do
    [ "${KIND[$n]}" = imgsync ] || continue
    [ "${OKS[$n]}" = ok ] || { GOALS[$n]="FAIL"; GOAL_LINES+=("- $n: FAIL (${NOTE[$n]})"); continue; }
    g=
    if [ "${SRCOF[$n]}" = changed ]; then
        r=$(pm "${WIRE[$n]} <= $GOAL_WIRE_BYTES")
        g="wire $r"
        GOAL_LINES+=("- $n wire: $(mib "${WIRE[$n]}") MiB vs ≤ $(mib "$GOAL_WIRE_BYTES") MiB (${GOAL_WIRE_X} × $(mib "$CH_ZSTD") + ${GOAL_WIRE_DATA} × $(mib "$SRC_DATA")): **$r**")
        if [ -n "$best_rsync" ]; then
            r=$(pm "${WALL[$n]} <= $GOAL_WALL * $best_rsync")
            GOAL_LINES+=("- $n wall: ${WALL[$n]} s vs ≤ $(awk -v b="$best_rsync" -v g="$GOAL_WALL" 'BEGIN{printf "%.2f", g * b}') s (${GOAL_WALL} × $best_rsync_name $best_rsync s; ratio $(ratio "${WALL[$n]}" "$best_rsync")): **$r**")
        else r="- (no rsync row)"; fi
        g="$g · wall $r"
    else
        if [ -n "$read_ref" ]; then
            r=$(pm "${WALL[$n]} <= $GOAL_NOCHANGE * $read_ref")
            GOAL_LINES+=("- $n wall: ${WALL[$n]} s vs ≤ $(awk -v b="$read_ref" -v g="$GOAL_NOCHANGE" 'BEGIN{printf "%.2f", g * b}') s (${GOAL_NOCHANGE} × read-src $read_ref s; ratio $(ratio "${WALL[$n]}" "$read_ref")): **$r**")
        else r="- (no read-src row)"; fi
        g="nochange $r"
    fi
    GOALS[$n]=$g
done
{
    echo
    echo "| row | src | wall s | wire MiB | blocks sent | data-sent MiB | imgsync wire-bytes MiB | journal MiB | RSS client/server MiB | CPU client/server s | correct | goals | note |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
    for n in "${ORDER[@]}"; do
        s=disk-changed; [ "${SRCOF[$n]}" = raw ] && s=disk
        if [ "${OKS[$n]}" != ok ]; then
            echo "| $n | $s | - | - | - | - | - | - | - | - | FAIL | ${GOALS[$n]:--} | ${NOTE[$n]//|/\\|} |"
            continue
        fi
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %s | %s | %s |\n' "$n" "$s" "${WALL[$n]}" "$(mib "${WIRE[$n]}")" \
            "${JBS[$n]:--}" "$(mibo "${JDS[$n]:-}")" "$(mibo "${JWB[$n]:-}")" "$(mibo "${JJB[$n]:-}")" \
            "$(kib_mib "${CRSS[$n]}")" "$(kib_mib "${SRSS[$n]}")" "${CCPU[$n]}" "${SCPU[$n]}" \
            "$([ "${KIND[$n]}" = ref ] && echo - || echo ok)" "${GOALS[$n]:--}" "${NOTE[$n]//|/\\|}"
    done
    echo
    echo "Goals:"
    printf '%s\n' "${GOAL_LINES[@]}"
    echo
} | tee -a "$REPORT"
echo "report: $REPORT; logs: $OUT_DIR/logs" >&2
[ "$FAILED" = 0 ] || { echo "FAIL: some rows failed (see above)" | tee -a "$REPORT"; exit 1; }
