#!/usr/bin/env bash
# Benchmark: `imgsync convert` vs `qemu-img convert`, side by side in one run,
# on VM-disk-like images made by ../shared/bench/mkimages.sh (default 16 GiB
# virtual, 1.5 GiB data). Rows: qcow2->raw, raw->qcow2, raw->qcow2 compressed
# (zstd for both), raw->raw. Per row it prints the best wall time of RUNS runs
# and the peak RSS of that run for both tools, the allocation (du -B1) of each
# output, and the ratios imgsync/qemu-img of wall time and of allocation.
#
# Fairness: imgsync fsyncs its output, qemu-img does not by default, so both
# are timed as `sh -c 'CMD && sync -f OUT'` (the flush is inside the timed
# region for both). The page cache is dropped before every run (DROP=0 skips
# this; needs root) so both tools read cold. Runs alternate imgsync, qemu-img.
# After every imgsync run (outside the timed region) `qemu-img compare` of
# source vs output must exit 0, and a qcow2 output must pass `qemu-img check`
# cleanly; otherwise the script prints FAIL and exits non-zero.
#
# Images live in IMG_DIR (default /tmp/bench-data/images), generated only when
# IMG_DIR/disk.raw is missing (SIZE/DATA are passed to mkimages.sh then);
# outputs go to OUT_DIR (default /tmp/bench-data/convert-out), emptied before
# each run. Nothing big is ever written into the repo.
#
#   bench/convert.sh                       # build release, make images once, measure
#   SIZE=2G DATA=200M IMG_DIR=/tmp/bench-data/smoke RUNS=1 bench/convert.sh   # smoke
#   ROWS="qcow2-raw raw-raw" RUNS=5 bench/convert.sh     # only some rows
#   IMGSYNC=/path/to/imgsync DROP=0 VERBOSE=1 bench/convert.sh   # VERBOSE: every run to stderr
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
IMG_DIR=${IMG_DIR:-/tmp/bench-data/images}
OUT_DIR=${OUT_DIR:-/tmp/bench-data/convert-out}
MKIMAGES=${MKIMAGES:-$top/../shared/bench/mkimages.sh}
RUNS=${RUNS:-3}
DROP=${DROP:-1}
ROWS=${ROWS:-"qcow2-raw raw-qcow2 raw-qcow2-c raw-raw"}
VERBOSE=${VERBOSE:-0}

if [ ! -x /usr/bin/time ]; then
    apt-get install -y time >/dev/null
fi

cargo build --release --quiet --manifest-path "$top/Cargo.toml"
IMGSYNC=${IMGSYNC:-$top/target/release/imgsync}

if [ ! -f "$IMG_DIR/disk.raw" ]; then
    # SIZE / DATA (if set) reach mkimages.sh through the environment.
    "$MKIMAGES" "$IMG_DIR" >&2
fi
raw=$IMG_DIR/disk.raw
qcow=$IMG_DIR/disk.qcow2
for f in "$raw" "$qcow"; do
    [ -f "$f" ] || { echo "missing $f (remove $IMG_DIR/disk.raw to regenerate)" >&2; exit 1; }
done

drop_caches() {
    sync
    if [ "$DROP" != 0 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# verify SRC SRCFMT OUT OUTFMT: the output reads like the source, qcow2 is clean.
verify() {
    local src=$1 sfmt=$2 out=$3 ofmt=$4 log
    if ! log=$(qemu-img compare -f "$sfmt" -F "$ofmt" "$src" "$out" 2>&1); then
        fail "qemu-img compare $src $out: $log"
    fi
    if [ "$ofmt" = qcow2 ]; then
        if ! log=$(qemu-img check -f qcow2 "$out" 2>&1) || ! grep -q 'No errors were found' <<<"$log"; then
            fail "qemu-img check $out: $log"
        fi
    fi
}

# run_once OUT CMD...: fresh out dir, cold cache, time `CMD && sync -f OUT`.
# Prints "seconds rss_kib".
run_once() {
    local out=$1; shift
    local tf t0 t1
    rm -rf "$OUT_DIR"
    mkdir -p "$OUT_DIR"
    drop_caches
    tf=$(mktemp)
    t0=$(date +%s%N)
    if ! /usr/bin/time -o "$tf" -f '%M' sh -c 'out=$1; shift; "$@" && exec sync -f "$out"' sh "$out" "$@" >/dev/null; then
        rm -f "$tf"
        fail "command failed: $*"
    fi
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" -v m="$(tail -n 1 "$tf")" 'BEGIN{printf "%.3f %s\n", (b - a) / 1e9, m}'
    if [ "$VERBOSE" != 0 ]; then
        awk -v a="$t0" -v b="$t1" -v m="$(tail -n 1 "$tf")" -v c="$*" 'BEGIN{printf "  %.3f s %6d KiB  %s\n", (b - a) / 1e9, m, c}' >&2
    fi
    rm -f "$tf"
}

# better T BEST: true when T < BEST or BEST is empty.
better() { [ -z "$2" ] || awk -v a="$1" -v b="$2" 'BEGIN{exit !(a < b)}'; }

alloc() { du -B1 "$1" | cut -f1; }

mib() { awk -v b="$1" 'BEGIN{printf "%.1fMiB", b / 1048576}'; }

echo "# imgsync convert vs qemu-img convert; images: $IMG_DIR, RUNS=$RUNS, drop caches: $([ "$DROP" != 0 ] && echo yes || echo no)"
echo "# $(head -n 1 "$IMG_DIR/stats.txt" 2>/dev/null | sed 's/^# //' || echo "(no stats.txt)")"
echo "# imgsync: $IMGSYNC ($(nproc) cores, default --threads); $(qemu-img --version | head -n 1)"
echo "# wall = best of RUNS incl. 'sync -f OUT'; rss = peak RSS of that run; alloc = du -B1 of the output"
printf '%-12s %9s %10s %9s %10s %7s %12s %12s %7s\n' \
    row imgsync_s imgsync_rss qemu_s qemu_rss wall_x imgsync_out qemu_out alloc_x

for row in $ROWS; do
    case $row in
    qcow2-raw)   src=$qcow sfmt=qcow2 ofmt=raw   iargs=() qargs=() ;;
    raw-qcow2)   src=$raw  sfmt=raw   ofmt=qcow2 iargs=() qargs=() ;;
    raw-qcow2-c) src=$raw  sfmt=raw   ofmt=qcow2 iargs=(-c) qargs=(-c -o compression_type=zstd) ;;
    raw-raw)     src=$raw  sfmt=raw   ofmt=raw   iargs=() qargs=() ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
    esac
    out=$OUT_DIR/out.$ofmt
    ibest="" irss="" ialloc="" qbest="" qrss="" qalloc=""
    for _ in $(seq "$RUNS"); do
        r=$(run_once "$out" "$IMGSYNC" convert -q -f "$sfmt" -O "$ofmt" "${iargs[@]}" "$src" "$out") ||
            fail "imgsync run failed ($row)"
        read -r t m <<<"$r"
        a=$(alloc "$out")
        verify "$src" "$sfmt" "$out" "$ofmt"
        if better "$t" "$ibest"; then ibest=$t irss=$m ialloc=$a; fi
        r=$(run_once "$out" qemu-img convert -f "$sfmt" -O "$ofmt" "${qargs[@]}" "$src" "$out") ||
            fail "qemu-img run failed ($row)"
        read -r t m <<<"$r"
        a=$(alloc "$out")
        if better "$t" "$qbest"; then qbest=$t qrss=$m qalloc=$a; fi
    done
    rm -rf "$OUT_DIR"
    wx=$(awk -v a="$ibest" -v b="$qbest" 'BEGIN{printf "%.2f", a / b}')
    ax=$(awk -v a="$ialloc" -v b="$qalloc" 'BEGIN{ if (b > 0) printf "%.3f", a / b; else print "-" }')
    printf '%-12s %9s %7sMiB %9s %7sMiB %7s %12s %12s %7s\n' "$row" \
        "$ibest" "$((irss / 1024))" "$qbest" "$((qrss / 1024))" "$wx" \
        "$(mib "$ialloc")" "$(mib "$qalloc")" "$ax"
done
echo "# all imgsync outputs verified (qemu-img compare; qemu-img check for qcow2)"
