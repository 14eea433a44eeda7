"""I/O through the guest's SWIOTLB pool, in time order, and the ``swiotlb-io`` scenario
(docs/model.md §11).

:func:`run_io` drives a :class:`gmemfast.scenarios.swiotlb.SwiotlbMem` with an
:class:`IoPattern`: each vCPU keeps up to ``queue_depth`` requests in flight, mapping
(and copying in) before the device and unmapping (copying out) after it; a map that
finds no slots waits for the next unmap or fails; with dynamic growth the growth worker
and the atomic pools' resize work convert guest memory to shared through the runner,
like any conversion, and their time is the time those conversions are estimated to
take. Events are processed in time order (a heap), so every slot operation happens in
the order the guest would do it.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..report import format_ns, format_size_short
from ..units import PAGE_SIZE, format_size
from .params import ScenarioError
from .runner import PRIVATE, TWO_MIB, Runner
from .swiotlb import (DYN_POOL_MAX, IO_TLB_MIN_SLABS, IO_TLB_SEGSIZE, IO_TLB_SHIFT, IO_TLB_SIZE,
                      MAX_MAPPING, AtomicPools, Pool, SwiotlbMem, default_nslabs, limit_nareas,
                      nareas_for, pow2_ceil)

__all__ = ["IoPattern", "IoStats", "LowMemory", "low_floor", "place_default", "run_io", "swiotlb_io"]


@dataclass
class IoPattern:
    """What the guest's I/O does: ``bursts`` bursts, in each every one of ``vcpus`` vCPUs
    issues ``burst`` requests of ``io_size`` bytes (split into mappings of at most 256 KiB),
    at most ``queue_depth`` in flight; ``gap_ns`` of idle time between bursts.
    ``direction`` ``read`` is DMA from the device (bounced at map, to keep what the
    device does not overwrite, and at unmap), ``write`` to it (at map only).
    ``on_full``: ``wait`` retries a failed map when slots are freed, ``fail`` drops the
    request. The device takes at least ``latency_ns`` per request and moves ``rate``
    bytes per ns in all."""
    vcpus: int = 8
    io_size: int = 128 << 10
    queue_depth: int = 32
    bursts: int = 4
    burst: int = 256
    gap_ns: float = 1e6
    direction: str = "read"
    on_full: str = "wait"
    latency_ns: float = 20e3
    rate: float = 2.2

    @property
    def segments(self) -> list[int]:
        n, rest = divmod(self.io_size, MAX_MAPPING)
        return [MAX_MAPPING] * n + ([rest] if rest else [])


@dataclass
class _Io:
    vcpu: int
    maps: list
    nbytes: int
    t0: float


@dataclass
class IoStats:
    """What :func:`run_io` saw."""
    requests: int = 0
    completed: int = 0
    failed_requests: int = 0
    exhaustion_events: int = 0
    waits: int = 0
    wait_ns: float = 0.0
    bytes_transferred: int = 0
    bytes_bounced: int = 0
    transient_maps: int = 0
    growth_pools: int = 0
    growth_bytes: int = 0
    growth_failed: int = 0
    atomic_expansions: int = 0
    atomic_bytes: int = 0
    released_pools: int = 0
    released_bytes: int = 0
    conversions_to_shared: int = 0
    conversions_to_private: int = 0
    pages_to_shared: int = 0
    pages_to_private: int = 0
    elapsed_ns: float = 0.0
    hiwater_slots: int = 0
    burst_ns: list = field(default_factory=list)
    latency_ns: list = field(default_factory=list)      # per request, from issue to unmap


class LowMemory:
    """Where new pools go: downward from ``top`` (the default pool's start), each aligned
    to its size rounded up to a power of two (a buddy allocation), not below ``floor``;
    freed ranges are reused first."""

    def __init__(self, top: int, floor: int):
        self.next = top
        self.floor = floor
        self.freed: list[tuple[int, int]] = []

    def take(self, nbytes: int) -> int:
        for i, (off, n) in enumerate(self.freed):
            if n == nbytes:
                del self.freed[i]
                return off
        align = pow2_ceil(max(nbytes, PAGE_SIZE))
        off = (self.next - nbytes) // align * align
        if off < self.floor:
            return -1
        self.next = off
        return off

    def give_back(self, off: int, nbytes: int) -> None:
        self.freed.append((off, nbytes))


def _convert(run: Runner, off: int, nbytes: int, attrs: int, stats: IoStats) -> float:
    """The guest converts ``[off, off+nbytes)``, one page-state-change request (an exit)
    per 2 MiB. To shared, the pages come from the page allocator, which accepts what was
    not accepted yet (``accept_memory()``, 4 MiB at a time); back to private, the guest
    validates them again (``set_memory_encrypted()``). Returns the work's estimated time
    in ns, priced as the run's counters are."""
    before = run.counts_now()
    offs = np.arange(off, off + nbytes, TWO_MIB, dtype=np.int64)
    sizes = np.minimum(offs + TWO_MIB, off + nbytes) - offs
    if attrs:
        run.convert_many(offs, sizes, attrs, exits=True, label="swiotlb")
        run.accept(off, nbytes, TWO_MIB)
        stats.conversions_to_private += len(offs)
        stats.pages_to_private += nbytes // PAGE_SIZE
    else:
        run.accept_units(off, nbytes, TWO_MIB)
        run.convert_many(offs, sizes, attrs, exits=True, label="swiotlb")
        stats.conversions_to_shared += len(offs)
        stats.pages_to_shared += nbytes // PAGE_SIZE
    ns = run.cost.ns_per_unit
    return sum((n - before[k]) * ns.get(k, 0.0) for k, n in run.counts_now().items() if n != before[k])


class _Work:
    """A work item (``schedule_work()``): queued once; queued again if scheduled while it
    runs."""

    def __init__(self):
        self.pending = False
        self.running = False

    def schedule(self) -> bool:
        """True if it should start now."""
        if self.pending:
            return False
        self.pending = True
        return not self.running

    def start(self) -> None:
        self.pending = False
        self.running = True

    def finish(self) -> bool:
        """True if it must run again."""
        self.running = False
        return self.pending


def run_io(run: Runner, mem: SwiotlbMem, pat: IoPattern, low: LowMemory, *, bounce: bool = True,
           release_ns: float | None = None, copy_ns: float = 0.0, samples: int = 0) -> IoStats:
    """Drive ``mem`` with ``pat`` (events in time order); growth and release convert
    guest memory through ``run``. ``bounce=False``: no SWIOTLB, the device reaches the
    buffers directly. ``copy_ns``: ns per byte bounced (the run's ``bytes_copied``)."""
    st = IoStats()
    V = pat.vcpus
    segs = pat.segments
    rate = max(pat.rate, 1e-12)
    heap: list = []
    seq = [0]

    def at(t, kind, arg=None):
        seq[0] += 1
        heapq.heappush(heap, (t, seq[0], kind, arg))

    busy = [0.0] * V
    inflight = [0] * V
    remaining = [0] * V
    done_q = [deque() for _ in range(V)]
    waiting: dict[int, float] = {}
    issued = [deque() for _ in range(V)]      # when each outstanding request was issued
    scheduled = [False] * V
    dev_free = [0.0]
    grow, expand = _Work(), _Work()
    burst_no = [0]
    burst_t0 = [0.0]
    pool_idle: dict[int, float] = {}
    last = [0.0]

    def wake(v, t):
        if not scheduled[v]:
            scheduled[v] = True
            at(max(t, busy[v]), "try", v)

    def start_burst(t):
        burst_t0[0] = t
        for v in range(V):
            remaining[v] = pat.burst
            issued[v].extend([t] * min(pat.queue_depth, pat.burst))
            wake(v, t)

    def issue_next(v, t):
        # the application keeps queue_depth requests outstanding
        if remaining[v] > len(issued[v]):
            issued[v].append(t)

    def quiet() -> bool:
        return not any(remaining) and not any(inflight) and not any(done_q)

    def end_burst(t):
        st.burst_ns.append(t - burst_t0[0])
        burst_no[0] += 1
        if samples:
            run.bound("io", t)
            run.sample()
        run.progress("I/O bursts", burst_no[0], pat.bursts)
        if burst_no[0] < pat.bursts:
            at(t + pat.gap_ns, "burst")

    def ask_growth(t):
        if grow.schedule():
            at(t, "grow")

    def ask_expand(t):
        if expand.schedule():
            at(t, "expand")

    def try_map(v, t):
        maps = []
        asked = False
        for s in segs:
            m, grown = mem.map(v, s)
            asked |= grown
            if m is None:
                for x in maps:
                    mem.unmap(x)
                return None, asked, sum(x.nbytes for x in maps)
            if m.atomic >= 0:
                st.transient_maps += 1
            maps.append(m)
        return maps, asked, 0

    def do_try(v, t):
        scheduled[v] = False
        if t < busy[v]:
            wake(v, t)
            return
        if done_q[v]:
            io = done_q[v].popleft()
            cost = io.nbytes * copy_ns if (bounce and pat.direction == "read") else 0.0
            busy[v] = t + cost
            at(busy[v], "unmapped", io)
            return
        if remaining[v] <= 0 or inflight[v] >= pat.queue_depth or v in waiting:
            return
        st.requests += 1
        if not bounce:
            maps, wasted = [], 0
        else:
            maps, asked, wasted = try_map(v, t)
            if asked:
                ask_growth(t)
            if mem.atomic is not None and mem.atomic.low():
                ask_expand(t)
            if wasted:
                st.bytes_bounced += wasted
                busy[v] = t + wasted * copy_ns
        if maps is None:
            st.exhaustion_events += 1
            stuck = (not any(inflight) and not grow.running and not grow.pending
                     and not expand.running and not expand.pending)
            if pat.on_full == "fail" or stuck:
                issued[v].popleft()
                st.failed_requests += 1
                remaining[v] -= 1
                issue_next(v, t)
                wake(v, t)
                if quiet():
                    end_burst(t)
            else:
                st.requests -= 1             # the same request is tried again
                st.waits += 1
                waiting[v] = t
            return
        for m in maps:
            if m.pool.kind == "dynamic":
                pool_idle.pop(id(m.pool), None)
        cost = pat.io_size * copy_ns if bounce else 0.0
        if bounce:
            st.bytes_bounced += pat.io_size
        busy[v] = t + cost
        inflight[v] += 1
        remaining[v] -= 1
        at(busy[v], "submit", _Io(v, maps, pat.io_size, issued[v].popleft()))
        wake(v, busy[v])

    def do_submit(io, t):
        start = max(t, dev_free[0])
        dev_free[0] = start + io.nbytes / rate
        at(max(t + pat.latency_ns, dev_free[0]), "done", io)

    def do_unmapped(io, t):
        v = io.vcpu
        for m in io.maps:
            mem.unmap(m)
            p = m.pool
            if p.kind == "dynamic" and p.used == 0 and release_ns is not None:
                pool_idle[id(p)] = t
                at(t + release_ns, "reap", (p, t))
        if bounce and pat.direction == "read":
            st.bytes_bounced += io.nbytes
        st.bytes_transferred += io.nbytes
        st.completed += 1
        st.latency_ns.append(t - io.t0)
        inflight[v] -= 1
        issue_next(v, t)
        last[0] = t
        wake_waiters(t)
        wake(v, t)
        if quiet():
            end_burst(t)

    def do_grow(t):
        grow.start()
        nslabs = min(mem.default_slabs, DYN_POOL_MAX >> IO_TLB_SHIFT)
        nareas = limit_nareas(mem.nareas, nslabs)
        off = -1
        while True:
            off = low.take(nslabs << IO_TLB_SHIFT)
            if off >= 0 or nslabs <= IO_TLB_MIN_SLABS:
                break
            nslabs = -(-(nslabs >> 1) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE
            nareas = limit_nareas(nareas, nslabs)
        if off < 0:
            st.growth_failed += 1
            at(t, "grown", None)
            return
        pool = Pool(nslabs, nareas, offset=off, kind="dynamic")
        ns = _convert(run, off, pool.nbytes, 0, st)
        st.growth_pools += 1
        st.growth_bytes += pool.nbytes
        at(t + ns, "grown", pool)

    def wake_waiters(t):
        for u, since in list(waiting.items()):
            st.wait_ns += t - since
            del waiting[u]
            wake(u, t)

    def do_grown(pool, t):
        if pool is not None:
            mem.add_pool(pool)
            if release_ns is not None:
                pool_idle[id(pool)] = t
                at(t + release_ns, "reap", (pool, t))
        wake_waiters(t)
        if grow.finish():
            at(t, "grow")

    def do_expanded(t):
        wake_waiters(t)
        if expand.finish():
            at(t, "expand")

    def do_expand(t):
        expand.start()
        ns = 0.0
        for i, nbytes in mem.atomic.expansions():
            off = low.take(nbytes)
            if off < 0:
                continue
            ns += _convert(run, off, nbytes, 0, st)
            mem.atomic.grow(i, nbytes)
            st.atomic_expansions += 1
            st.atomic_bytes += nbytes
        at(t + ns, "expanded")

    def do_reap(arg, t):
        pool, stamp = arg
        if pool_idle.get(id(pool)) != stamp or pool.used or pool not in mem.pools:
            return
        del pool_idle[id(pool)]
        mem.remove_pool(pool)
        _convert(run, pool.offset, pool.nbytes, PRIVATE, st)
        low.give_back(pool.offset, pool.nbytes)
        st.released_pools += 1
        st.released_bytes += pool.nbytes

    handlers = {
        "try": lambda a, t: do_try(a, t),
        "submit": lambda a, t: do_submit(a, t),
        "done": lambda a, t: (done_q[a.vcpu].append(a), wake(a.vcpu, t)),
        "unmapped": lambda a, t: do_unmapped(a, t),
        "grow": lambda a, t: do_grow(t),
        "grown": lambda a, t: do_grown(a, t),
        "expand": lambda a, t: do_expand(t),
        "expanded": lambda a, t: do_expanded(t),
        "reap": lambda a, t: do_reap(a, t),
        "burst": lambda a, t: start_burst(t),
    }
    if pat.bursts and pat.burst:
        start_burst(0.0)
    while heap:
        t, _s, kind, arg = heapq.heappop(heap)
        handlers[kind](arg, t)
    st.elapsed_ns = last[0]
    st.hiwater_slots = mem.hiwater
    return st


# ---------------------------------------------------------------------------- the scenario

LOW_FLOOR = 64 << 20        # no pool below: the kernel image, firmware data and early allocations


def low_floor(run: Runner) -> int:
    """The lowest byte a pool may use: 64 MiB, or half of a smaller guest's memory."""
    return min(LOW_FLOOR, run.low // 2 // TWO_MIB * TWO_MIB)


def place_default(run: Runner, nslabs: int) -> tuple[int, int]:
    """(offset, slots) of the default pool: memblock_alloc_low() from the top of low
    memory, halved until it fits (``swiotlb_init_remap()``)."""
    floor = low_floor(run)
    while True:
        nbytes = nslabs << IO_TLB_SHIFT
        off = (run.low - nbytes) // TWO_MIB * TWO_MIB
        if off >= floor:
            return off, nslabs
        if nslabs <= IO_TLB_MIN_SLABS:
            raise ScenarioError(f"no SWIOTLB pool fits the guest's low memory ({format_size(run.low)})")
        nslabs = -(-(nslabs >> 1) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE


def swiotlb_io(run: Runner, p: dict) -> None:
    """Phase ``swiotlb`` (boot CPU): the default pool is accepted (memblock) and converted
    to shared (``swiotlb_update_mem_attributes()``).
    Phase ``io`` (on ``vcpus``): the I/O pattern, with the pool growing (``dynamic``) and
    dynamic pools released after ``release`` unused; its wall time is the I/O's own
    timeline (requests through the device, bounce copies, waits for slots)."""
    vcpus = p["vcpus"]
    pat = IoPattern(vcpus=vcpus, io_size=p["io_size"], queue_depth=p["queue_depth"], bursts=p["bursts"],
                    burst=p["requests"], gap_ns=float(p["gap"]), direction=p["direction"],
                    on_full=p["on_full"], latency_ns=float(p["latency"]), rate=p["device_rate"] / 1e9)
    if pat.queue_depth < 1:
        raise ScenarioError("queue_depth must be at least 1")
    bounce = p["pool"] != "off"
    setup = IoStats()
    if not run.in_place:
        run.phase("set-private")
        run.set_private_all()
    floor = low_floor(run)
    run.phase("swiotlb")
    nareas = nareas_for(vcpus)
    mem = SwiotlbMem(None, dynamic=False, nareas=nareas)
    low = LowMemory(run.low, floor)
    pool_off = pool_bytes = 0
    if bounce:
        want = default_nslabs(run.size, vcpus, None if p["pool"] == "auto" else p["pool"])
        pool_off, nslabs = place_default(run, want)
        pool = Pool(nslabs, limit_nareas(nareas, nslabs), offset=pool_off)
        pool_bytes = pool.nbytes
        _convert(run, pool_off, pool_bytes, 0, setup)
        low = LowMemory(pool_off, floor)
        atomic = AtomicPools(run.size) if p["dynamic"] else None
        mem = SwiotlbMem(pool, dynamic=p["dynamic"], atomic=atomic, nareas=nareas, default_slabs=want)
    run.sample()
    run.phase("io", threads=vcpus)
    copy_ns = run.cost.ns_per_unit.get("bytes_copied", 0.0)
    release = None if p["release"] == "never" else float(p["release"])
    st = run_io(run, mem, pat, low, bounce=bounce, release_ns=release, copy_ns=copy_ns,
                samples=True)
    run.count("bytes_copied", st.bytes_bounced)
    run.bound("io", st.elapsed_ns)
    run.sample()
    shared = (pool_bytes + st.growth_bytes - st.released_bytes + st.atomic_bytes) if bounce else 0
    rate = st.bytes_transferred / st.elapsed_ns if st.elapsed_ns else 0.0
    lat = np.asarray(st.latency_ns) if st.latency_ns else np.zeros(1)
    areas = mem.pools[-1].nareas if mem.pools else 0
    run.extra["swiotlb"] = {
        "pool_bytes": pool_bytes, "pool_offset": pool_off, "nareas": areas,
        "dynamic": bool(p["dynamic"]) and bounce,
        "atomic_pool_bytes": mem.atomic.size0 if mem.atomic is not None else 0,
        "requests": st.requests, "completed": st.completed, "failed_requests": st.failed_requests,
        "exhaustion_events": st.exhaustion_events, "waits": st.waits, "wait_ns": st.wait_ns,
        "bytes_transferred": st.bytes_transferred, "bytes_copied": st.bytes_bounced,
        "transient_maps": st.transient_maps, "growth_pools": st.growth_pools,
        "growth_bytes": st.growth_bytes, "growth_failed": st.growth_failed,
        "atomic_expansions": st.atomic_expansions, "atomic_bytes": st.atomic_bytes,
        "growth_conversions": st.conversions_to_shared, "growth_pages_to_shared": st.pages_to_shared,
        "released_pools": st.released_pools, "released_bytes": st.released_bytes,
        "release_conversions": st.conversions_to_private,
        "shared_bytes": shared, "hiwater_slots": st.hiwater_slots,
        "io_ns": st.elapsed_ns, "throughput_gb_per_s": rate, "burst_ns": list(st.burst_ns),
        "latency_mean_ns": float(lat.mean()), "latency_p99_ns": float(np.percentile(lat, 99)),
        "latency_max_ns": float(lat.max()),
    }
    size = format_size_short
    run.extra["figures"] = {
        "SWIOTLB pool": (f"{size(pool_bytes)} in {areas} areas" + (", dynamic" if p["dynamic"] else ""))
                        if bounce else "off",
        "I/O time": f"{format_ns(st.elapsed_ns)} ({rate:.2f} GB/s)",
        "request latency mean/p99": f"{format_ns(float(lat.mean()))} / {format_ns(float(np.percentile(lat, 99)))}",
        "requests done / failed": f"{st.completed:,} / {st.failed_requests:,}",
        "bytes bounced": size(st.bytes_bounced),
        "exhaustion events": f"{st.exhaustion_events:,}",
        "transient mappings": f"{st.transient_maps:,}",
        "growth: pools / atomic": (f"{st.growth_pools} ({size(st.growth_bytes)}) / "
                                   f"{st.atomic_expansions} ({size(st.atomic_bytes)})"),
        "growth conversions": f"{st.conversions_to_shared:,} ({size(st.pages_to_shared * PAGE_SIZE)})",
        "released pools": f"{st.released_pools} ({st.conversions_to_private:,} conversions)",
        "shared for SWIOTLB": size(shared),
        "most slots in use": f"{st.hiwater_slots:,} ({size(st.hiwater_slots * IO_TLB_SIZE)})",
    }
