#!/usr/bin/env bash
# Remakes testdata/sample.qcow2: a 64 MiB-virtual qcow2 v3 (64 KiB clusters)
# with compressed and plain data runs and zero clusters. Needs
# qemu-img and qemu-io. The committed file is what this script made.
set -euo pipefail
cd "$(dirname "$0")"
rm -f sample.qcow2 sample.tmp.qcow2
qemu-img create -q -f qcow2 sample.tmp.qcow2 64M
qemu-io -f qcow2 \
    -c 'write -P 0x11 0 128k' \
    -c 'write -P 0x22 1M 64k' \
    -c 'write -z 2M 256k' \
    -c 'write -P 0x33 10M 512k' \
    -c 'discard 10M 128k' \
    -c 'write -P 0x44 63M 1M' \
    sample.tmp.qcow2 >/dev/null
# Compress the data clusters; keep one plain data run to show both kinds.
qemu-img convert -c -f qcow2 -O qcow2 sample.tmp.qcow2 sample.qcow2
qemu-io -f qcow2 -c 'write -P 0x55 20M 64k' -c 'write -z 30M 128k' sample.qcow2 >/dev/null
rm -f sample.tmp.qcow2
qemu-img check -q sample.qcow2
