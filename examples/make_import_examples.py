"""Make the recorded-style examples that `gmemfast import` reads.

    python examples/make_import_examples.py          # writes the three files below

The guest: 4 GiB, SNP, as QEMU's q35 lays it out (2 GiB at GPA 0, 2 GiB at GPA 4 GiB).
What it does, as each recording would show it:

1. QEMU marks all memory private at startup (one range below 4 GiB, one above);
2. the guest converts its SWIOTLB pool to shared and, under bursty I/O, grows it and
   releases what it grew (the ``swiotlb-io`` scenario: a 1 MiB pool, dynamic growth,
   pools released after 100 us unused);
3. a driver shares a few pages above 4 GiB and takes them back.

The files are made by the project's own code (``gmemfast.importers.render``) and are the
same on every run; ``tests/test_importers.py`` checks that they still are.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gmemfast import scenarios as S
from gmemfast.importers import render
from gmemfast.trace import CONVERT, OpList

HERE = Path(__file__).resolve().parent
SIZE = 4 << 30
FILES = {"trace-cmd": "recorded-trace-cmd.txt", "bpftrace": "recorded-bpftrace.txt",
         "qemu": "recorded-qemu.log"}


def conversions():
    """The example's conversions, as a trace (guest_memfd offsets)."""
    ops = OpList("example")
    ops.add(CONVERT, 0, 2 << 30, 8)                  # QEMU: all RAM private, low ...
    ops.add(CONVERT, 2 << 30, 2 << 30, 8)            # ... and high
    res = S.run_scenario("swiotlb-io", {"size": "4G", "vcpus": 2, "pool": "1M", "dynamic": True,
                                        "release": "100us", "requests": 32, "bursts": 2,
                                        "queue_depth": 16, "io_size": "256K"}, record=True)
    rec = res.ops
    keep = np.flatnonzero(rec.kind == CONVERT)
    ops.add_many(CONVERT, rec.offset[keep], rec.size[keep], rec.a[keep], 0)
    rng = np.random.default_rng(11)
    pages = (2 << 30) + rng.choice(1 << 18, 6, replace=False) * 4096
    ops.add_many(CONVERT, pages, 4096, 0, 0)         # shared for a driver ...
    ops.add_many(CONVERT, pages, 4096, 8, 0)         # ... and back
    return ops.build()


def write(folder: Path = HERE) -> dict:
    ops = conversions()
    out = {}
    for fmt, name in FILES.items():
        path = folder / name
        path.write_text(render(fmt, ops, SIZE))
        out[fmt] = path
    return out


if __name__ == "__main__":
    for fmt, path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE).items():
        print(f"{fmt}: {path}")
