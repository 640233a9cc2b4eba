#!/usr/bin/env python3
"""Compares two `map --output json` outputs as sets of data and zero byte
ranges (host offsets and depth ignored). Exit 0 when equal."""
import json
import sys


def ranges(extents, key):
    out = []
    for e in extents:
        if e[key] and (key == "data" or not e["data"]):
            s, n = e["start"], e["length"]
            if out and out[-1][1] == s:
                out[-1][1] = s + n
            else:
                out.append([s, s + n])
    return out


a, b = (json.load(open(p)) for p in sys.argv[1:3])
ok = all(ranges(a, k) == ranges(b, k) for k in ("data", "zero"))
print("maps agree" if ok else "MAPS DIFFER", f"({len(ranges(a, 'data'))} data ranges)")
sys.exit(0 if ok else 1)
