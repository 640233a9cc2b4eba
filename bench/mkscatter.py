#!/usr/bin/env python3
"""Writes DATA bytes of pseudo-random data in scattered chunks into a sparse
raw file of SIZE bytes (deterministic for a seed). Usage:
    mkscatter.py PATH SIZE DATA [SEED]
Chunks are 64 KiB to 1 MiB, 64 KiB aligned, at random places; the rest stays
a hole."""
import os
import random
import sys


def main():
    path, size, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 42)
    block = 64 << 10
    pool = rng.randbytes(4 << 20)
    with open(path, "wb") as f:
        f.truncate(size)
        written = 0
        while written < data:
            n = min(rng.randint(1, 16) * block, data - written)
            off = rng.randrange(0, (size - n) // block) * block
            start = rng.randrange(0, len(pool) - n)
            os.pwrite(f.fileno(), pool[start:start + n], off)
            written += n
    print(f"{path}: {size} bytes virtual, {data} bytes written")


if __name__ == "__main__":
    main()
