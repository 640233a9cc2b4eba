#!/usr/bin/env bash
# Benchmark: `imgsync map` vs `qemu-img map` on a 1 TiB-virtual qcow2 (64 KiB
# clusters) holding 1.5 GiB of scattered data, and on the raw equivalent.
# Prints wall time and peak RSS of both, and the ratio imgsync/qemu-img, from
# one run. Images go to $DIR (default /tmp/bench-data/map), never the repo.
#
#   bench/map.sh                 # build release, make images once, measure
#   SIZE=$((1<<40)) DATA=$((1536<<20)) RUNS=3 bench/map.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DIR:-/tmp/bench-data/map}
SIZE=${SIZE:-$((1 << 40))}
DATA=${DATA:-$((1536 << 20))}
RUNS=${RUNS:-3}
mkdir -p "$DIR"

cargo build --release --quiet --manifest-path "$top/Cargo.toml"
IMGSYNC=${IMGSYNC:-$top/target/release/imgsync}

raw=$DIR/scatter.raw
qcow=$DIR/scatter.qcow2
if [ ! -f "$qcow" ] || [ "$(stat -c %s "$raw" 2>/dev/null)" != "$SIZE" ]; then
    python3 "$top/bench/mkscatter.py" "$raw" "$SIZE" "$DATA"
    qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$raw" "$qcow"
fi

# measure NAME CMD...: best-of-RUNS wall seconds and the peak RSS (KiB) of that run.
measure() {
    local best="" rss=""
    for _ in $(seq "$RUNS"); do
        local out t0 t1 t m
        t0=$(date +%s%N)
        out=$( { /usr/bin/time -f '%M' "$@" >/dev/null; } 2>&1 | tail -n 1)
        t1=$(date +%s%N)
        t=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.4f", (b - a) / 1e9}')
        m=$out
        if [ -z "$best" ] || awk -v a="$t" -v b="$best" 'BEGIN{exit !(a<b)}'; then best=$t; rss=$m; fi
    done
    echo "$best $rss"
}

printf '%-8s %-10s %10s %12s %10s %12s %8s\n' image output imgsync_s imgsync_rss qemu_s qemu_rss ratio
for img in "$qcow:qcow2" "$raw:raw"; do
    path=${img%:*} fmt=${img##*:}
    for output in json human; do
        qout=$output; [ "$output" = json ] && qout=json
        read -r it irss < <(measure "$IMGSYNC" map -f "$fmt" --output "$output" "$path")
        read -r qt qrss < <(measure qemu-img map -f "$fmt" --output="$qout" "$path")
        ratio=$(awk -v a="$it" -v b="$qt" 'BEGIN{ printf "%.2f", a / b }')
        printf '%-8s %-10s %10s %10sKiB %10s %10sKiB %8s\n' "$fmt" "$output" "$it" "$irss" "$qt" "$qrss" "$ratio"
    done
done
# Same answer: data ranges of both tools' JSON maps must match.
python3 "$top/bench/samemap.py" <("$IMGSYNC" map -f qcow2 --output json "$qcow") <(qemu-img map -f qcow2 --output=json "$qcow")
echo "extents: imgsync $("$IMGSYNC" map -f qcow2 --output json "$qcow" | grep -c '"data": true') data runs (qcow2)"
