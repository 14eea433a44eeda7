"""The building blocks scenarios are made of: launch, accept everything, SWIOTLB, random
conversions in a window, balloon rounds, and what a booting guest accepts eagerly or
lazily (docs/model.md §10.3)."""
from __future__ import annotations

import math

import numpy as np

from .. import trace as T
from ..firmware import snp_launch_plan
from ..launch import LaunchRun, Loader, launch_runs, load_image
from ..uapi import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                    KVM_SEV_SNP_PAGE_TYPE_NORMAL)
from ..units import PAGE_SHIFT, PAGE_SIZE, format_size
from .params import MAX_CONVERSIONS, ScenarioError
from .runner import ACCEPT_UNIT, BATCH, ONE_GIB, PRIVATE, TWO_MIB, Runner

__all__ = ["FIRMWARE_ACCEPT", "KERNEL_GPA", "TIMELINE_POINTS", "batches", "boot_regions",
           "do_accept_all", "do_accept_rest", "do_balloon", "do_boot_accept", "do_drain",
           "do_launch", "do_swiotlb", "do_window", "free_reserve", "memmap_size", "subtract",
           "swiotlb_default", "swiotlb_region"]

TIMELINE_POINTS = 100           # about this many samples per long phase
KERNEL_GPA = 16 << 20           # LOAD_PHYSICAL_ADDR of x86-64 kernels
FIRMWARE_ACCEPT = 512 << 20     # what the firmware accepts before the kernel (docs/model.md §10.3)
STRUCT_PAGE = 64                # bytes of memmap (struct page) per 4 KiB page


def subtract(ranges, taken) -> list[tuple[int, int]]:
    """``ranges`` (list of (start, end)) less every range of ``taken``, sorted, merged."""
    out = []
    for a, b in sorted(ranges):
        pieces = [(a, b)]
        for s_a, s_b in taken:
            nxt = []
            for x, y in pieces:
                if s_b <= x or s_a >= y:
                    nxt.append((x, y))
                    continue
                if x < s_a:
                    nxt.append((x, s_a))
                if s_b < y:
                    nxt.append((s_b, y))
            pieces = nxt
        out.extend(p for p in pieces if p[1] > p[0])
    merged: list[tuple[int, int]] = []
    for a, b in sorted(out):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def memmap_size(size: int) -> int:
    """The guest's memmap: one 64-byte struct page per 4 KiB page, allocated (and so
    accepted) by memblock at boot, 2 MiB aligned."""
    n = (size // PAGE_SIZE) * STRUCT_PAGE
    return -(-n // TWO_MIB) * TWO_MIB


def free_reserve(size: int) -> int:
    """Free memory the page allocator keeps accepted: the zone's promo watermark, which
    cond_accept_memory() accepts up to (mm/page_alloc.c; min_free_kbytes =
    sqrt(16 x memory in KiB) clamped to [128 KiB, 256 MiB], watermark gap = the larger of
    a quarter of it and 0.1% of memory, promo = min + 3 gaps), in accept units."""
    kib = size // 1024
    min_kib = min(max(math.isqrt(kib * 16), 128), 262144)
    gap = max(min_kib // 4, kib * 10 // 10000)
    n = (min_kib + 3 * gap) * 1024
    return -(-n // ACCEPT_UNIT) * ACCEPT_UNIT


def batches(n: int, batch: int):
    for s in range(0, n, batch):
        yield s, min(n, s + batch)


def swiotlb_default(size: int) -> int:
    """Linux's SWIOTLB size for a confidential guest: 6% of memory, clamped to
    [64 MiB, 1 GiB] (mem_encrypt_setup_arch), 2 MiB aligned; at most a quarter of a
    tiny guest."""
    s = min(max(size * 6 // 100, 64 << 20), ONE_GIB)
    s = min(s, size // 4)
    return max(PAGE_SIZE, s // TWO_MIB * TWO_MIB or s // PAGE_SIZE * PAGE_SIZE)


def swiotlb_region(run: Runner, size) -> tuple[int, int]:
    """(offset, size) of the SWIOTLB pool: memblock puts it at the top of low memory."""
    nbytes = swiotlb_default(run.size) if size in ("auto", None) else (
        run.size if size == "all" else size)
    if nbytes <= 0 or nbytes > run.low:
        raise ScenarioError(f"SWIOTLB size {format_size(nbytes)} does not fit the guest's low "
                            f"memory ({format_size(run.low)})")
    top = run.low
    off = (top - nbytes) // TWO_MIB * TWO_MIB
    if off < 0:
        off = 0
    return off, nbytes


class _RunnerLoader(Loader):
    """The launch loader, with the main guest memory's conversions and writes going
    through the runner (counted as its operations and recorded in traces)."""

    def __init__(self, run: Runner):
        super().__init__(run.vm, run.p["flow"], mark_private=False, share_first=True)
        self.run = run

    def convert(self, gmem, offset, size, attributes, flags=0):
        if gmem is self.run.gmem:
            self.run.convert(offset, size, attributes, flags)
        else:
            super().convert(gmem, offset, size, attributes, flags)

    def write(self, gmem, offset, data):
        if gmem is self.run.gmem:
            self.run.write(offset, len(data), data=data)
        else:
            super().write(gmem, offset, data)

    def populate(self, run: LaunchRun, source) -> None:
        r = self.run
        ms = self.vm.memslot_for(run.gpa)
        if ms is not None and ms.gmem is r.gmem and r.ops is not None:
            # populate faults the pages in, one by one
            off = ms.gmem_offset + run.gpa - ms.gpa
            r.ops.add_many(T.ALLOCATE, np.arange(off, off + (run.nr_pages << PAGE_SHIFT), PAGE_SIZE),
                           PAGE_SIZE, 0, 0)
        super().populate(run, source)


def kernel_bytes(run: Runner, kernel: int) -> bytes:
    """The synthetic kernel image of ``kernel`` bytes (random, from the run's seed)."""
    return np.random.default_rng(run.p["seed"]).integers(0, 256, kernel, np.uint8).tobytes()


def do_launch(run: Runner, ovmf="synthetic", kernel: int = 16 << 20, vcpus: int = 1, *,
              kernel_load: str = "measured") -> None:
    """Launch: the firmware image below 4 GiB and a kernel image at 16 MiB, measured by
    the platform (SNP launch digest / TDX MRTD). ``kernel_load="measured"``: the kernel
    is populated as measured launch pages (a VMM that pre-encrypts it); ``"hashes"``:
    QEMU's way, the firmware loads it later and only its hash enters the launch, in the
    SNP kernel-hashes page (TDX: TDVF measures it at run time), docs/model.md §10.3."""
    try:
        image = load_image(ovmf)
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"ovmf: {exc}") from None
    vm, flow, platform = run.vm, run.p["flow"], run.platform
    if KERNEL_GPA + kernel > run.low:
        raise ScenarioError(f"kernel image of {format_size(kernel)} at 16M does not fit the guest's "
                            f"low memory ({format_size(run.low)})")
    if run.low < 0x1000000:
        raise ScenarioError(f"boot needs at least 16M of guest memory (firmware data sits at 8M), "
                            f"not {format_size(run.size)}")
    # The flash: its own guest_memfd ending at 4 GiB (memslot 2).
    fw_flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED if flow == "in-place" else (
        GUEST_MEMFD_FLAG_MMAP if platform == "sw-protected" else 0)
    fw = vm.create_guest_memfd(image.size, fw_flags)
    vm.set_user_memory_region(2, image.gpa, image.size, fw)
    if not run.in_place:
        vm.set_memory_attributes(image.gpa, image.size, PRIVATE)
    if kernel and kernel_load == "hashes" and platform == "snp":
        try:
            plan = snp_launch_plan(image, vcpus, kernel=kernel_bytes(run, kernel))
        except ValueError as exc:
            raise ScenarioError(f"kernel_load hashes: {exc} (use kernel_load measured)") from None
        runs = [LaunchRun(r.gpa, r.nr_pages, r.contents, r.page_type) for r in plan.runs]
        vmsas = plan.vmsas
    else:
        runs, vmsas = launch_runs(platform, image, vcpus)
    if kernel and kernel_load == "measured":
        runs.append(LaunchRun(KERNEL_GPA, kernel >> PAGE_SHIFT, kernel_bytes(run, kernel),
                              KVM_SEV_SNP_PAGE_TYPE_NORMAL if platform == "snp" else True))
        run.mark_accepted(KERNEL_GPA, kernel)
    loader = _RunnerLoader(run)
    total = sum(r.nr_pages for r in runs)
    done = 0
    for r in runs:
        loader.load_run(r)
        done += r.nr_pages
        run.steps += 1
        run.progress("launching", done, total)
    digest = loader.finish(vmsas)
    if digest is not None:
        run.extra["measurement"] = digest.hex()
        run.extra["measurement_kind"] = "SNP launch digest" if platform == "snp" else "TDX MRTD"
        if platform == "snp":       # what sev-snp-measure needs to compute the same digest
            run.extra["measured_with"] = (f"{vcpus} vCPU{'s' if vcpus > 1 else ''}, vCPU type EPYC-v4, "
                                          "VMM type QEMU")
    run.extra["launch_pages"] = total
    run.extra["firmware_bytes"] = image.size
    run.extra["kernel_bytes"] = kernel
    run.extra["kernel_load"] = kernel_load


def boot_regions(run: Runner, swiotlb="auto") -> dict[str, tuple[int, int]]:
    """What a booting guest accepts even when it accepts lazily, as file ranges (docs/model.md
    §10.3): the firmware's first ``FIRMWARE_ACCEPT`` bytes (TDVF's lazy partial accept;
    the kernel image is loaded there), the memmap and the free-memory reserve at the top
    of memory (memblock allocates top down; the page allocator keeps its promo watermark
    accepted), and the SWIOTLB pool (memblock, converted to shared later)."""
    size = run.size
    mm = min(memmap_size(size), size)
    top = size - mm
    reserve = min(free_reserve(size), top)
    sw_off, sw_len = swiotlb_region(run, swiotlb)
    return {
        "firmware": (0, min(FIRMWARE_ACCEPT, run.low)),
        "memmap": (top, size),
        "reserve": (top - reserve, top),
        "swiotlb": (sw_off, sw_off + sw_len),
    }


def do_boot_accept(run: Runner, chunk: int, *, kernel: int = 0, kernel_load: str = "measured",
                   swiotlb="auto", taken=()) -> list[tuple[int, int]]:
    """The acceptance every boot does on the boot CPU: the firmware's (phase ``firmware``,
    with the kernel's load when it comes as hashes), then the kernel's early memory
    (phase ``accept-boot``). Returns the ranges accepted, ``taken`` included."""
    regions = boot_regions(run, swiotlb)
    done = list(taken)
    run.phase("firmware")
    a, b = regions["firmware"]
    for x, y in subtract([(a, b)], done):
        run.accept_units(x, y - x, chunk, kernel=False)
    done.append((a, b))
    if kernel and kernel_load == "hashes":
        # the firmware copies the kernel in from the VMM and checks its hash
        run.count("guest_pages_touched", kernel >> PAGE_SHIFT)
    run.sample()
    run.phase("accept-boot")
    for name in ("memmap", "reserve", "swiotlb"):
        a, b = regions[name]
        for x, y in subtract([(a, b)], done):
            run.accept_units(x, y - x, chunk)
        done.append((a, b))
    run.sample()
    accepted = subtract([(0, run.size)], subtract([(0, run.size)], done))
    run.extra["accepted_at_boot"] = sum(b - a for a, b in accepted)
    return accepted


def do_accept_rest(run: Runner, chunk: int, taken, points: int = TIMELINE_POINTS) -> None:
    """Eager acceptance: the rest of memory, as deferred memory init frees it (run the
    phase on the vCPUs)."""
    rest = subtract([(0, run.size)], taken)
    total = sum(b - a for a, b in rest)
    for a, b in rest:
        slices = max(1, round(points * (b - a) / total)) if total else 1
        step = -(-(b - a) // slices)
        step = -(-step // ACCEPT_UNIT) * ACCEPT_UNIT
        for x in range(a, b, step):
            run.accept_units(x, min(step, b - x), chunk)
            run.progress("accepting", x + step - a, b - a)
            run.sample()


def do_drain(run: Runner, chunk: int, taken, points: int = TIMELINE_POINTS) -> int:
    """Lazy acceptance driven by a workload touching all memory: each unit is accepted
    when the page allocator first hands it out, and every page of it is touched
    (``guest_pages_touched``). Returns the bytes accepted."""
    rest = subtract([(0, run.size)], taken)
    total = sum(b - a for a, b in rest)
    done = 0
    step = max(ACCEPT_UNIT, -(-total // max(1, points)) // ACCEPT_UNIT * ACCEPT_UNIT)
    for a, b in rest:
        for x in range(a, b, step):
            n = min(step, b - x)
            _units, pages = run.accept_units(x, n, chunk, label="draining")
            run.count("guest_pages_touched", pages)
            done += n
            run.progress("draining", done, total)
            run.sample()
    return done


def do_accept_all(run: Runner, chunk: int, skip=(), points: int = 10) -> None:
    """The guest accepts all its memory (except ``skip`` ranges, already accepted)."""
    ranges = [(0, run.size)]
    for s_off, s_len in sorted(skip):
        out = []
        for a, b in ranges:
            if s_off >= b or s_off + s_len <= a:
                out.append((a, b))
                continue
            if a < s_off:
                out.append((a, s_off))
            if s_off + s_len < b:
                out.append((s_off + s_len, b))
        ranges = out
    total = sum(b - a for a, b in ranges)
    done = 0
    for a, b in ranges:
        slices = max(1, round(points * (b - a) / total)) if total else 1
        with run.span(done / total, (done + b - a) / total):
            run.accept(a, b - a, chunk, slices=slices)
        done += b - a


def do_swiotlb(run: Runner, size="auto", chunk: int = TWO_MIB) -> tuple[int, int]:
    """The guest converts its SWIOTLB pool to shared, ``chunk`` per request."""
    off, nbytes = swiotlb_region(run, size)
    chunk = nbytes if chunk in (0, None) else chunk
    offs = np.arange(off, off + nbytes, chunk, dtype=np.int64)
    sizes = np.minimum(chunk, off + nbytes - offs)
    run.convert_many(offs, sizes, 0, exits=True, label="swiotlb")
    run.extra["swiotlb_offset"] = off
    run.extra["swiotlb_bytes"] = nbytes
    return off, nbytes


def do_window(run: Runner, region_off: int, region_size: int, count: int, *, window: int,
              granule: int = PAGE_SIZE, reaccept: bool = True, exits: bool = True,
              pages=None, shared_phase="to-shared", private_phase="to-private") -> None:
    """``count`` guest conversions of random ``granule`` pieces of a region to shared;
    each piece goes back to private (and is accepted again) ``window`` conversions
    later. The last ``window`` pieces stay shared. Batched; one sample per batch."""
    nslots = region_size // granule
    if nslots <= 0:
        raise ScenarioError(f"region of {format_size(region_size)} holds no {format_size(granule)} piece")
    if pages is None:
        offs = run.rng.integers(0, nslots, count, dtype=np.int64)
        offs *= granule                 # in place: one 8-byte offset per conversion
        offs += region_off
    else:
        offs = region_off + pages * granule
    window = max(1, window)
    every = max(1, -(-count // TIMELINE_POINTS))
    batch = max(1, min(window, every, BATCH))
    back = 0
    next_sample = every
    for s, e in batches(count, batch):
        run.phase(shared_phase)
        run.convert_many(offs[s:e], granule, 0, exits=exits, label=None)
        upto = max(0, e - window)
        if upto > back:
            run.phase(private_phase)
            errs = run.convert_many(offs[back:upto], granule, PRIVATE, exits=exits, label=None)
            if reaccept:
                run.accept_many(offs[back:upto], granule, PAGE_SIZE if granule < TWO_MIB else TWO_MIB,
                                just_converted=not errs.any(), label=None)
            back = upto
        run.progress("converting", e, count)
        if e >= next_sample or e == count:
            run.sample()
            next_sample = e + every


def do_balloon(run: Runner, nbytes: int, granule: int, rounds: int, *, chunk: int = TWO_MIB) -> None:
    """Balloon rounds: inflate (punch random ``granule`` blocks) then deflate (the guest
    accepts them again)."""
    nblocks = run.size // granule
    want = nbytes // granule
    if want <= 0:
        raise ScenarioError(f"balloon of {format_size(nbytes)} holds no {format_size(granule)} block")
    if want > nblocks:
        raise ScenarioError(f"balloon of {format_size(nbytes)} is larger than the guest")
    if nblocks > MAX_CONVERSIONS:
        raise ScenarioError(f"a balloon of {format_size(granule)} blocks: the guest holds {nblocks:,} of "
                            f"them, at most {MAX_CONVERSIONS:,} (2^28); use a larger granule")
    chunk = chunk if granule % chunk == 0 else PAGE_SIZE
    for r in range(rounds):
        with run.part(r, rounds, f"round {r + 1}/{rounds}" if rounds > 1 else ""):
            _balloon_round(run, nblocks, want, nbytes, granule, chunk,
                           f" {r + 1}" if rounds > 1 else "")


def _balloon_round(run: Runner, nblocks: int, want: int, nbytes: int, granule: int, chunk: int,
                   nth: str) -> None:
    """One inflate and deflate (``nth``: the round's number in labels, or empty)."""
    if run.private_pages() == run.gmem.nr_pages:
        blocks = np.sort(run.rng.choice(nblocks, want, replace=False)) * granule
    else:
        # the guest balloons out private memory only: take random wholly private blocks
        picked = []
        for b in run.rng.permutation(nblocks).tolist():
            if run.is_private(b * granule, granule):
                picked.append(b)
                if len(picked) == want:
                    break
        if len(picked) < want:
            raise ScenarioError(f"balloon of {format_size(nbytes)}: only {len(picked)} wholly "
                                f"private {format_size(granule)} blocks left")
        blocks = np.sort(np.array(picked, np.int64)) * granule
    run.phase("inflate")
    run.mark("inflate" + nth)
    every = max(1, want // 50)
    with run.part(0, 2):
        for s, e in batches(want, every):
            run.punch_many(blocks[s:e], granule)
            run.progress("inflating", e, want)
            if want >= 200:
                run.sample()
    run.sample()
    run.phase("deflate")
    run.mark("deflate" + nth)
    with run.part(1, 2):
        for s, e in batches(want, every):
            run.accept_many(blocks[s:e], granule, chunk, label=None)
            run.progress("deflating", e, want)
            if want >= 200:
                run.sample()
    run.sample()
