#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ with small real qcow2 images made by qemu-img
# and qemu-io: tiny virtual sizes, 512 B and 64 KiB clusters, compressed
# (zlib and zstd) clusters, extended L2, zero clusters, a backing file name,
# version 2. The corpus directories are not committed; rerun this instead.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mk() { # name opts size qemu-io-commands...
    local name=$1 opts=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name.qcow2" "$size"
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if [ ${#args[@]} -gt 0 ]; then
        qemu-io -f qcow2 "${args[@]}" "$tmp/$name.qcow2" >/dev/null
    fi
}

mk empty-64k cluster_size=64k 1M
mk data-512 cluster_size=512 64k 'write -P 0x11 0 1k' 'write -z 4k 2k' 'write -P 0x22 60k 512'
mk data-64k cluster_size=64k 1M 'write -P 0x11 0 64k' 'write -z 128k 64k' 'write -P 0x22 960k 4k'
mk v2-512 compat=0.10,cluster_size=512 32k 'write -P 0x33 1k 1k'
mk extl2-16k extended_l2=on,cluster_size=16k 256k 'write -P 0x44 0 1k' 'write -z 2k 1k' 'write -P 0x55 20k 3k'
mk extl2-64k extended_l2=on,cluster_size=64k 1M 'write -P 0x44 4k 4k' 'write -z 64k 8k'
mk plain-zlib cluster_size=4k 64k 'write -P 0x77 0 16k' 'write -P 0x78 32k 4k'
mk plain-zstd cluster_size=4k,compression_type=zstd 64k 'write -P 0x79 0 16k'
qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=4k "$tmp/plain-zlib.qcow2" "$tmp/comp-zlib.qcow2"
qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=4k,compression_type=zstd \
    "$tmp/plain-zstd.qcow2" "$tmp/comp-zstd.qcow2"
qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=512 "$tmp/data-512.qcow2" "$tmp/comp-512.qcow2"
qemu-img create -q -u -f qcow2 -o cluster_size=512 -b base.raw -F raw "$tmp/backing.qcow2" 16k
# Compressed clusters written by qemu-io (the file ends inside the last
# descriptor's last sector), and the same file cut before that sector
# (metadata damage for map and check).
python3 -c 'import random, sys; r = random.Random(3); sys.stdout.buffer.write(bytes(r.randrange(16) for _ in range(8192)))' >"$tmp/text.bin"
mk comp-io cluster_size=4k 64k "write -c -s $tmp/text.bin 0 8k"
size=$(stat -c %s "$tmp/comp-io.qcow2")
head -c $(( size / 512 * 512 - 512 )) "$tmp/comp-io.qcow2" >"$tmp/comp-io-cut.qcow2"

# Internal snapshots (the second taken last: its L2 tables are shared),
# preallocated metadata, 1-bit and 64-bit refcounts.
mk snap-4k cluster_size=4k,refcount_bits=64 256k 'write -P 0x61 0 64k' 'write -z 128k 8k'
qemu-img snapshot -c s1 "$tmp/snap-4k.qcow2"
qemu-io -f qcow2 -c 'write -P 0x62 16k 8k' "$tmp/snap-4k.qcow2" >/dev/null
qemu-img snapshot -c s2 "$tmp/snap-4k.qcow2"
mk prealloc-4k cluster_size=4k,preallocation=metadata 64k 'write -P 0x63 4k 4k'
mk rc1-512 cluster_size=512,refcount_bits=1 32k 'write -P 0x64 0 4k'

for target in qcow2_header image_map_read; do
    mkdir -p "corpus/$target"
    cp "$tmp"/*.qcow2 "corpus/$target/"
done
ls -l corpus/image_map_read

# qcow2_update: byte 0 the mode, byte 1 the number of 3-byte operations
# (kind, then a big-endian guest cluster index): writes, zeros, a flush,
# a resize, a flush. Mode 0 seeds carry a qemu-made image after them;
# mode 1 seeds four blank-image parameters (cluster size, refcount order,
# size, flags: 1 version 2, 2 extended L2, 4 backing file).
mkdir -p corpus/qcow2_update
ops='\x00\x00\x01\x08\x00\x05\x04\x00\x02\x06\x00\x00\x0b\x00\x03\x0c\x00\x01\x07\x00\x40\x06\x00\x00'
for f in "$tmp"/*.qcow2; do
    { printf '\x00\x08'; printf "$ops"; cat "$f"; } >"corpus/qcow2_update/$(basename "$f")"
done
for p in '\x00\x04\x10\x00' '\x03\x00\x08\x01' '\x05\x06\x20\x06' '\x07\x04\x04\x05'; do
    name=blank-$(printf "$p" | od -An -tx1 | tr -d ' ')
    { printf '\x01\x08'; printf "$ops"; printf "$p"; } >"corpus/qcow2_update/$name"
done
ls -l corpus/qcow2_update

# sync_files: a torn journal of a killed `imgsync sync --block-size 4k`
# (mode byte 2: its header is patched to name the fuzzer's scratch DST)
# and a hash cache left by a sync (mode byte 1, block size
# byte 4 = 64 KiB, then the size << 4, little-endian).
cargo build -q --manifest-path ../Cargo.toml
bin=../target/debug/imgsync
python3 - "$tmp" <<'PY'
import os, random, sys
for name, seed in (("a.raw", 1), ("b.raw", 2)):
    f = os.open(os.path.join(sys.argv[1], name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    r = random.Random(seed)
    for i in range(64):
        os.pwrite(f, r.randbytes(1 << 20), i * (4 << 20))
    os.ftruncate(f, 512 << 20)
    os.close(f)
PY
mkdir -p corpus/sync_files
"$bin" sync -q --block-size 4k "$tmp/a.raw" "$tmp/b.raw" &
pid=$!
j=$tmp/.b.raw.imgsync-journal
for _ in $(seq 500); do
    if [ -s "$j" ] && [ "$(stat -c %s "$j")" -gt 200000 ]; then kill -9 $pid; break; fi
    sleep 0.01
done
wait $pid || true
{ printf '\x02'; head -c 150000 "$j"; } >corpus/sync_files/journal-torn
cp --sparse=always "$tmp/a.raw" "$tmp/c.raw"
"$bin" sync -q "$tmp/a.raw" "$tmp/c.raw"
python3 - "$tmp/.c.raw.imgsync-hashes" corpus/sync_files/hashes-64k <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
open(sys.argv[2], "wb").write(b"\x01\x04" + struct.pack("<Q", (512 << 20) << 4) + d)
PY
ls -l corpus/sync_files
