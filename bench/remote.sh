#!/usr/bin/env bash
# Benchmark (issue 4): push a VM disk image over SSH with `imgsync convert`
# vs the peer tools of ../shared/bench/tools.sh, side by side in one run, at
# several link rates. Image: disk.raw from ../shared/bench/mkimages.sh (16 GiB
# virtual, 1.5 GiB allocated). Link: the harness's namespaces isrc -> idst
# (veth shaped with tc tbf, sshd in idst at 10.99.0.2, ../shared/bench/netns.sh).
#
# Rows (per rate):
#   imgsync-zN      built-in SSH client (libssh2), --compress-level N (N in LEVELS)
#   imgsync-ext-zN  -e "ssh -F /tmp/bench-ssh/ssh_config" (OpenSSH), level N (EXT_LEVELS)
#   qemu-img-ssh    qemu-img convert -p -f raw -O raw SRC ssh://root@10.99.0.2DST?host_key_check=...
#   rsync-zstd      rsync -a --sparse -z --zc=zstd -e "$SSH" SRC dst:DST
#   qcow2c-zlib+scp qemu-img convert -O qcow2 -c (zlib) to a local temp, then scp
#   qcow2c-zstd+scp same with -o compression_type=zstd
# (peer command lines exactly as in tools.sh.)
# Per row: wall time, wire bytes (veth counters of vsrc, both directions, via
# wire.sh), destination allocation (du -B1), peak RSS and user+sys CPU of the
# client (/usr/bin/time around the whole client command, children included)
# and, for imgsync, of the server (--remote-imgsync is a wrapper that runs the
# real `imgsync serve` under /usr/bin/time), and correctness: `qemu-img
# compare` of source vs destination must exit 0, else the row says FAIL (the
# script goes on and exits 1 at the end).
#
# Fairness: every command is timed as CMD; then `sync -f DST` run in the
# destination namespace (the same filesystem), both inside the timed region,
# so write-back of what any tool wrote counts. The page cache is dropped
# before every run (DROP=0 skips it) so every tool reads a cold source. The
# destination folder is emptied before every run. All tools run with the same
# ssh key and host; imgsync's built-in client gets explicit --known-hosts (a
# scratch file made from the bench host key), -i and --ssh-config /dev/null,
# and no ssh-agent, so nothing of ~/.ssh is used. The binary is snapshotted
# to OUT_DIR/bin before measuring (others may rebuild target/ meanwhile).
# The machine has 2 cores shared by both ends: a CPU-heavy tool competes
# with its own server side; other load on the machine skews everything (the
# 1-minute load average is printed per run; RUNS>1 keeps the best run).
#
# Ratios: wall / the fastest correct peer's wall at that rate; wire and dest
# allocation / source data = du -B1 of disk.raw (allocated bytes; imgsync's
# own "bytes-read" - "zero-bytes", its non-zero data, is printed too).
# Goals (issue 4), checked for every imgsync row: wall <= 0.5x the fastest
# peer at 1gbit, <= 0.85x at 100mbit; wire <= 0.6x source data; destination
# allocation <= source data; peak RSS of client and server <= 256 MiB.
#
# The namespaces are brought up (netns.sh up) if down and taken down again at
# the end; if they were up, the original RATE is restored at the end. Outputs
# (destinations, logs, report.md) go to OUT_DIR, never into the repo.
#
#   bench/remote.sh                                   # everything, ~15 min
#   RATES=1gbit LEVELS="1 3" bench/remote.sh          # quick look
#   ROWS='^1gbit:|^100mbit:imgsync' bench/remote.sh   # regex on RATE:ROW
#   RUNS=3 DROP=0 IMGSYNC=/path/to/imgsync bench/remote.sh
# Env:
#   RATES="1gbit 100mbit"   tc rates to measure at, in this order
#   ROWS=.        regex matched against "RATE:ROW" (e.g. 100mbit:imgsync-z9)
#   RUNS=1        runs per row, the best (lowest wall) is kept
#   DROP=1        sync + drop page caches before each run (0: warm cache)
#   LEVELS        --compress-level values of the built-in rows (default
#                 "auto 1 3 6" at 1gbit, "auto 1 3 6 9 12" at 100mbit);
#                 auto = no --compress-level (imgsync's adaptive default),
#                 0 = uncompressed
#   EXT_LEVELS=auto  levels of the -e (OpenSSH) rows
#   IMGSYNC       binary to measure (default: cargo build --release, then
#                 target/release/imgsync); used on both ends
#   CAP=900       per-run time limit, s (a timed-out run is a FAIL)
#   IMG_DIR=/tmp/bench-data/images   OUT_DIR=/tmp/bench-data/remote-out
#   VERBOSE=0     1: print every command line too
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$(cd "$top/../shared/bench" && pwd)}
IMG_DIR=${IMG_DIR:-/tmp/bench-data/images}
OUT_DIR=${OUT_DIR:-/tmp/bench-data/remote-out}
RATES=${RATES:-"1gbit 100mbit"}
ROWS=${ROWS:-.}
RUNS=${RUNS:-1}
DROP=${DROP:-1}
LEVELS=${LEVELS:-}
EXT_LEVELS=${EXT_LEVELS:-auto}
CAP=${CAP:-900}
VERBOSE=${VERBOSE:-0}
S=/tmp/bench-ssh
QMOD=${QEMU_MODULE_DIR:-/tmp/bench-data/qemu-mod}
RIP=10.99.0.2
GOAL_WIRE=0.6 GOAL_ALLOC=1.0 GOAL_RSS_MIB=256

die() { echo "remote.sh: $*" >&2; exit 2; }
say() { echo "$*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (namespaces, drop_caches)"
[ -x /usr/bin/time ] || apt-get install -y time >/dev/null || die "no /usr/bin/time"
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
cat >"$SRV" <<EOF
#!/bin/sh
# imgsync on the remote end, with its peak RSS and CPU recorded for bench/remote.sh
exec /usr/bin/time -o $SRV_TIME -f '%M %U %S' $BIN "\$@"
EOF
chmod +x "$SRV"

# ---------------------------------------------------------------- image
if [ ! -f "$IMG_DIR/disk.raw" ]; then
    say "== generating $IMG_DIR (mkimages.sh, ~50 s)"
    "$SHARED/mkimages.sh" "$IMG_DIR" >&2 || die "mkimages.sh failed"
fi
SRC=$IMG_DIR/disk.raw
SRC_DATA=$(du -B1 "$SRC" | cut -f1)
SRC_NZ= # from imgsync's json: bytes-read - zero-bytes

# ---------------------------------------------------------------- network
source "$top/bench/netns-take.sh"
netns_take "${RATES%% *}"
QSSH_Q="?host_key_check=sha256:$(cat $S/hostkey.sha256)"

# qemu's ssh block driver: module + the libssh it links (fetched, not installed)
QEMU_OK=1 QEMU_WHY=
qemu_prep() {
    "$SHARED/qemu-ssh-module.sh" "$QMOD" >/dev/null 2>&1 || { QEMU_WHY="qemu-ssh-module.sh failed"; return 1; }
    if ldd "$QMOD/block-ssh.so" | grep -q 'libssh.so.4 => not found'; then
        local w; w=$(mktemp -d)
        if (cd "$w" && apt-get download libssh-4 >/dev/null 2>&1) && dpkg-deb -x "$w"/libssh-4_*.deb "$w/x"; then
            mkdir -p "$QMOD/lib" && cp -a "$w"/x/usr/lib/*/libssh.so.4* "$QMOD/lib/"
        fi
        rm -rf "$w"
    fi
    local t=$OUT_DIR/qemu-probe.raw out
    truncate -s 1M "$t"
    ip netns exec idst rm -f "$OUT_DIR/qemu-probe.dst"
    if ! out=$(SSH_AUTH_SOCK=$S/agent.sock QEMU_MODULE_DIR=$QMOD LD_LIBRARY_PATH=$QMOD/lib \
        ip netns exec isrc qemu-img convert -f raw -O raw "$t" "ssh://root@$RIP$OUT_DIR/qemu-probe.dst$QSSH_Q" 2>&1); then
        QEMU_WHY="qemu-img ssh:// probe failed: $(echo "$out" | head -1)"; rm -f "$t" "$OUT_DIR/qemu-probe.dst"; return 1
    fi
    rm -f "$t" "$OUT_DIR/qemu-probe.dst"
}
qemu_prep || { QEMU_OK=0; say "!! qemu-img-ssh rows skipped: $QEMU_WHY"; }

# ---------------------------------------------------------------- rows
export SRC BIN SRV KH SSH SSHCFG RIP QSSH_Q S QMOD
export TMPD=$OUT_DIR/tmp ID=$S/id_ed25519
# rows RATE: lines "name<TAB>kind<TAB>dst-format<TAB>command"; kind imgsync|peer
rows() {
    local rate=$1 lv levels=$LEVELS
    if [ -z "$levels" ]; then
        case $rate in 1gbit) levels="auto 1 3 6" ;; 100mbit) levels="auto 1 3 6 9 12" ;; *) levels="auto 3" ;; esac
    fi
    local flag
    for lv in $levels; do
        # auto: no --compress-level (the level adapts while sending).
        if [ "$lv" = auto ]; then flag=; else flag="--compress-level $lv"; fi
        printf 'imgsync-z%s\timgsync\traw\t%s\n' "$lv" \
            "env -u SSH_AUTH_SOCK \"\$BIN\" convert -q --output json -O raw $flag --known-hosts \"\$KH\" -i \"\$ID\" --ssh-config /dev/null --remote-imgsync \"\$SRV\" \"\$SRC\" \"ssh://root@\$RIP\$DST\" >\"\$JSON\""
    done
    for lv in $EXT_LEVELS; do
        if [ "$lv" = auto ]; then flag=; else flag="--compress-level $lv"; fi
        printf 'imgsync-ext-z%s\timgsync\traw\t%s\n' "$lv" \
            "\"\$BIN\" convert -q --output json -O raw $flag -e \"\$SSH\" --remote-imgsync \"\$SRV\" \"\$SRC\" \"dst:\$DST\" >\"\$JSON\""
    done
    printf 'qemu-img-ssh\tpeer\traw\t%s\n' \
        "SSH_AUTH_SOCK=\$S/agent.sock QEMU_MODULE_DIR=\$QMOD LD_LIBRARY_PATH=\$QMOD/lib qemu-img convert -p -f raw -O raw \"\$SRC\" \"ssh://root@\$RIP\$DST\$QSSH_Q\""
    printf 'rsync-zstd\tpeer\traw\t%s\n' \
        "rsync -a --sparse -z --zc=zstd -e \"\$SSH\" \"\$SRC\" \"dst:\$DST\""
    printf 'qcow2c-zlib+scp\tpeer\tqcow2\t%s\n' \
        "qemu-img convert -f raw -O qcow2 -c \"\$SRC\" \"\$TMPD/x.qcow2\" && scp -q -F \"\$SSHCFG\" \"\$TMPD/x.qcow2\" \"dst:\$DST\"; rc=\$?; rm -f \"\$TMPD/x.qcow2\"; exit \$rc"
    printf 'qcow2c-zstd+scp\tpeer\tqcow2\t%s\n' \
        "qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd \"\$SRC\" \"\$TMPD/x.qcow2\" && scp -q -F \"\$SSHCFG\" \"\$TMPD/x.qcow2\" \"dst:\$DST\"; rc=\$?; rm -f \"\$TMPD/x.qcow2\"; exit \$rc"
}

# ---------------------------------------------------------------- measuring
declare -A WALL WIRE ALLOC CRSS SRSS CCPU SCPU OKS NOTE KIND
ORDER=()
FAILED=0
drop_caches() { sync; if [ "$DROP" != 0 ]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
fl() { awk "BEGIN{exit !($*)}"; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get(sys.argv[2], ""))' "$1" "$2" 2>/dev/null; }

# run_row RATE NAME KIND FMT CMD: RUNS runs, keep the best correct one.
run_row() {
    local rate=$1 name=$2 kind=$3 fmt=$4 cmd=$5 key=$1:$2
    local dstdir=$OUT_DIR/dst/$name run log ctime rc t0 t1 a0 b0 a1 b1 wall wire alloc ok note
    export DST=$dstdir/disk.$fmt JSON=$OUT_DIR/logs/$rate-$name.json
    ORDER+=("$key") KIND[$key]=$kind OKS[$key]=FAIL NOTE[$key]=
    for run in $(seq "$RUNS"); do
        log=$OUT_DIR/logs/$rate-$name-run$run.log ctime=$OUT_DIR/client.time
        rm -rf "$dstdir" "$TMPD"; mkdir -p "$dstdir" "$TMPD"
        rm -f "$JSON" "$SRV_TIME" "$ctime"
        drop_caches
        [ "$VERBOSE" != 0 ] && say "   \$ $cmd"
        local load; load=$(cut -d' ' -f1 /proc/loadavg)
        read -r a0 b0 < <(wire_snap)
        t0=$(date +%s%N)
        timeout -k 10 "$CAP" /usr/bin/time -o "$ctime" -f '%M %U %S' \
            ip netns exec isrc bash -c "$cmd" >"$log" 2>&1 </dev/null
        rc=$?
        [ -e "$DST" ] && ip netns exec idst sync -f "$DST"
        t1=$(date +%s%N)
        read -r a1 b1 < <(wire_snap)
        wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b - a) / 1e9}')
        wire=$((a1 - a0 + b1 - b0))
        if [ "$rc" != 0 ]; then
            note="rc=$rc$([ "$rc" = 124 ] && echo " (timeout ${CAP}s)"): $(tail -n 3 "$log" | tr '\n\t' '  ' | cut -c1-300)"
            say "-- $rate $name run $run: ${wall}s FAILED $note"
            NOTE[$key]=$note
            FAILED=1
            break
        fi
        alloc=$(du -B1 "$DST" | cut -f1)
        if out=$(qemu-img compare -f raw -F "$fmt" "$SRC" "$DST" 2>&1); then ok=ok
        else
            ok=FAIL; FAILED=1
            NOTE[$key]="qemu-img compare: $(echo "$out" | head -n 1)"
        fi
        local cr cu cs sr=- su=0 ss=0
        read -r cr cu cs < <(tail -n 1 "$ctime")
        if [ "$kind" = imgsync ]; then
            if [ -s "$SRV_TIME" ]; then read -r sr su ss < <(tail -n 1 "$SRV_TIME"); else sr=?; fi
            if [ -z "$SRC_NZ" ] && [ -s "$JSON" ]; then
                local br zb; br=$(jget "$JSON" bytes-read) zb=$(jget "$JSON" zero-bytes)
                [ -n "$br" ] && [ -n "$zb" ] && SRC_NZ=$((br - zb))
            fi
        fi
        say "$(printf -- '-- %-8s %-16s run %d: %8ss wire %6d MiB alloc %6d MiB rss %s/%s KiB cpu %.1f/%.1f s load %s %s' \
            "$rate" "$name" "$run" "$wall" $((wire >> 20)) $((alloc >> 20)) "$cr" "$sr" \
            "$(awk -v a="$cu" -v b="$cs" 'BEGIN{print a + b}')" "$(awk -v a="$su" -v b="$ss" 'BEGIN{print a + b}')" "$load" "$ok")"
        if [ "$ok" = ok ] && { [ "${OKS[$key]}" != ok ] || fl "$wall < ${WALL[$key]}"; }; then
            WALL[$key]=$wall WIRE[$key]=$wire ALLOC[$key]=$alloc OKS[$key]=ok
            CRSS[$key]=$cr SRSS[$key]=$sr
            CCPU[$key]=$(awk -v a="$cu" -v b="$cs" 'BEGIN{printf "%.1f", a + b}')
            SCPU[$key]=$([ "$kind" = imgsync ] && awk -v a="$su" -v b="$ss" 'BEGIN{printf "%.1f", a + b}' || echo -)
        elif [ "$ok" != ok ]; then
            say "   FAIL: ${NOTE[$key]}"
            break
        fi
    done
    rm -rf "$dstdir" "$TMPD"
}

mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b / 1048576}'; }
kib_mib() { case $1 in ''|-|\?) echo "$1" ;; *) awk -v k="$1" 'BEGIN{printf "%.0f", k / 1024}' ;; esac; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "-" }'; }
pm() { if fl "$1"; then echo PASS; else echo MISS; fi; }

table() { # RATE
    local rate=$1 key best= bestname= wgoal=
    case $rate in 1gbit) wgoal=0.5 ;; 100mbit) wgoal=0.85 ;; esac
    for key in "${ORDER[@]}"; do
        [[ $key == "$rate:"* && ${KIND[$key]} == peer && ${OKS[$key]} == ok ]] || continue
        if [ -z "$best" ] || fl "${WALL[$key]} < $best"; then best=${WALL[$key]} bestname=${key#*:}; fi
    done
    echo
    echo "### $rate ($(head -n 1 "$IMG_DIR/stats.txt" 2>/dev/null | sed 's/^# images in [^ ]* *(\(.*\))$/\1/'); source data (du -B1) $(mib "$SRC_DATA") MiB, imgsync non-zero data ${SRC_NZ:+$(mib "$SRC_NZ") MiB}; fastest peer: ${bestname:-none} ${best:+${best} s})"
    echo
    echo "| row | wall s | wire MiB | dest alloc MiB | RSS client/server MiB | CPU client/server s | wall/peer | wire/src | alloc/src | correct | goals (wall ≤${wgoal:-?}×, wire ≤${GOAL_WIRE}×, alloc ≤${GOAL_ALLOC}×, RSS ≤${GOAL_RSS_MIB} MiB) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    for key in "${ORDER[@]}"; do
        [[ $key == "$rate:"* ]] || continue
        local name=${key#*:}
        if [ "${OKS[$key]}" != ok ]; then
            echo "| $name | - | - | - | - | - | - | - | - | FAIL | ${NOTE[$key]//|/\\|} |"
            continue
        fi
        local w=${WALL[$key]} wi=${WIRE[$key]} al=${ALLOC[$key]} wr wir alr goals=-
        wr=$([ -n "$best" ] && ratio "$w" "$best" || echo -)
        wir=$(ratio "$wi" "$SRC_DATA") alr=$(ratio "$al" "$SRC_DATA")
        if [ "${KIND[$key]}" = imgsync ]; then
            local gw=- rss_ok
            [ -n "$wgoal" ] && [ "$wr" != - ] && gw=$(pm "$wr <= $wgoal")
            rss_ok=$(pm "${CRSS[$key]:-0} <= $GOAL_RSS_MIB * 1024 && $( [[ ${SRSS[$key]} =~ ^[0-9]+$ ]] && echo "${SRSS[$key]}" || echo 1e18) <= $GOAL_RSS_MIB * 1024")
            goals="wall $gw · wire $(pm "$wi <= $GOAL_WIRE * $SRC_DATA") · alloc $(pm "$al <= $GOAL_ALLOC * $SRC_DATA") · rss $rss_ok"
        fi
        printf '| %s | %s | %s | %s | %s / %s | %s / %s | %s | %s | %s | ok | %s |\n' "$name" "$w" "$(mib "$wi")" "$(mib "$al")" \
            "$(kib_mib "${CRSS[$key]}")" "$(kib_mib "${SRSS[$key]}")" "${CCPU[$key]}" "${SCPU[$key]}" "$wr" "$wir" "$alr" "$goals"
    done
}

REPORT=$OUT_DIR/report.md
{
    echo "## bench/remote.sh $(date -Is)"
    echo
    echo "imgsync $("$BIN" --version 2>/dev/null | awk '{print $2}') (git $(git -C "$top" rev-parse --short HEAD 2>/dev/null)$(git -C "$top" diff --quiet HEAD -- src 2>/dev/null || echo '+uncommitted src')); $(qemu-img --version | head -n 1); $(rsync --version | head -n 1 | awk '{print "rsync", $3}'); $(ssh -V 2>&1); $(nproc) cores; RUNS=$RUNS (best kept); page cache $([ "$DROP" != 0 ] && echo dropped || echo warm)."
    echo "wall includes 'sync -f DST' in the destination namespace; wire = both directions on the veth; alloc = du -B1; RSS/CPU client = the whole client command with children (ssh included), server = imgsync serve only (sshd not included)."
    [ "$QEMU_OK" = 1 ] || echo "qemu-img-ssh skipped: $QEMU_WHY"
} | tee "$REPORT"

for rate in $RATES; do
    RATE=$rate "$SHARED/netns.sh" shape >&2 || die "netns.sh shape $rate failed"
    while IFS=$'\t' read -r -u 3 name kind fmt cmd; do
        [[ "$rate:$name" =~ $ROWS ]] || continue
        if [ "$name" = qemu-img-ssh ] && [ "$QEMU_OK" != 1 ]; then continue; fi
        run_row "$rate" "$name" "$kind" "$fmt" "$cmd"
    done 3< <(rows "$rate")
    table "$rate" | tee -a "$REPORT"
done
echo | tee -a "$REPORT"
echo "report: $REPORT; logs: $OUT_DIR/logs" >&2
[ "$FAILED" = 0 ] || { echo "FAIL: some rows failed (see above)" | tee -a "$REPORT"; exit 1; }
