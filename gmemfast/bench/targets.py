"""Measure gmemfast against the issue's speed and memory targets, baselines side by side.

    python benchmarks/run_targets.py [--quick] [--json] [--only 1,3]

Each speed target runs in this one process, engine and baseline interleaved repeat by
repeat (so both see the same machine state), several repeats, medians.  Each memory
case runs in a fresh subprocess and reports its peak RSS.  ``run(quick)`` returns the
results as a dict (what ``gmemfast bench`` wraps); ``main()`` prints a table, or JSON.

Every workload is also checked (error codes, private page counts, folio orders, split
and merge counters), so a fast wrong answer cannot pass.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from . import workloads as W
from .baselines import DenseModel, RoaringModel

MIB = 1 << 20
TARGET_64T_BYTES = 256 * MIB
TARGET_1T_SPLIT_BYTES = 1536 * MIB


class CheckFailed(AssertionError):
    pass


def _check(cond, what):
    if not cond:
        raise CheckFailed(what)


def _timed(fn):
    """ns for one call of fn() (for calls long enough to time alone), gc off."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0
    finally:
        gc.enable()


def _interleaved(fns, repeats, min_sample_ns=5_000_000):
    """{name: [ns per call, ...]}: one sample of every fn per repeat, in turn.

    As timeit does, a sample of a short call is a loop of ``number`` calls lasting at
    least ``min_sample_ns`` (one call alone is dominated by timer and cache effects),
    and the garbage collector is off for the whole series.
    """
    t = time.perf_counter_ns
    numbers = {}
    for k, fn in fns.items():
        t0 = t()
        fn()
        numbers[k] = max(1, -(-min_sample_ns // max(t() - t0, 1)))
    out = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for k, fn in fns.items():
                n = numbers[k]
                t0 = t()
                for _ in range(n):
                    fn()
                out[k].append((t() - t0) / n)
    finally:
        gc.enable()
    return out


def _per_call_ns(calls):
    """Each (fn, args) timed separately: array of ns."""
    t = time.perf_counter_ns
    out = np.empty(len(calls), dtype=np.int64)
    gc.collect()
    gc.disable()
    try:
        for i, (fn, args) in enumerate(calls):
            t0 = t()
            fn(*args)
            out[i] = t() - t0
    finally:
        gc.enable()
    return out


def _timer_overhead_ns():
    t = time.perf_counter_ns
    a = np.empty(10001, dtype=np.int64)
    for i in range(a.size):
        a[i] = t()
    return float(np.median(np.diff(a)))


def _target(tid, title, metric, engine, baseline, baseline_name, ratio, checks, extra=None):
    t = {"id": tid, "title": title, "metric": metric, "engine": engine,
         "baseline": baseline, "baseline_name": baseline_name, "ratio": ratio,
         "checks": checks}
    t["passed"] = all(c["passed"] for c in checks)
    if extra:
        t.update(extra)
    return t


def _req(name, value, op, limit, unit=""):
    ok = value <= limit if op == "<=" else value >= limit
    return {"name": name, "value": value, "op": op, "limit": limit, "unit": unit,
            "passed": bool(ok), "margin": (value / limit) if limit else None}


# -- target 1 -------------------------------------------------------------------------
def target1(quick):
    gm = W.engine()
    P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    n = W.TIB_PAGES
    g = W.engine_1t_unallocated()
    from pyroaring import BitMap
    bm = BitMap()
    bm.add_range(0, n)
    rm = RoaringModel(n, 0)
    dm = DenseModel(n, 0)

    def eng():
        W.engine_whole_file_roundtrip(g, P)

    def bitmap():
        bm.remove_range(0, n)
        bm.add_range(0, n)

    for f in (eng, bitmap):
        f()
    fast = _interleaved({"engine": eng, "bitmap": bitmap}, 21 if quick else 101)

    def rmodel():
        rm.convert(0, n, False)
        rm.convert(0, n, True)

    def dmodel():
        dm.convert(0, n, False)
        dm.convert(0, n, True)
    slow = _interleaved({"roaring_model": rmodel, "dense": dmodel}, 3 if quick else 7)

    # correctness: both directions really happened, every page, nothing allocated
    g.set_memory_attributes(0, W.TIB, 0)
    _check(g.private_pages() == 0 and not g.is_private(W.TIB - W.PAGE), "T1: to shared did not take")
    _check(g.folio_order(0) == -1, "T1: a never-allocated file has a folio")
    g.set_memory_attributes(0, W.TIB, P)
    _check(g.private_pages() == n and g.is_private(0, W.TIB), "T1: back to private did not take")
    _check(len(bm) == n, "T1: bitmap")
    c0 = dict(g.counters)
    eng()
    c1 = dict(g.counters)
    work = {k: c1[k] - c0.get(k, 0) for k in c1 if c1[k] != c0.get(k, 0)}
    _check(work.get("pages_to_shared") == n and work.get("pages_to_private") == n,
           f"T1: a round trip should count {n} pages each way, counted {work}")

    med = {k: statistics.median(v) for k, v in {**fast, **slow}.items()}
    ratio = med["bitmap"] / med["engine"]
    return _target(
        1, "1 TiB never-allocated file, private->shared->private (one round trip)",
        "us per round trip (2 calls)", med["engine"] / 1e3, med["bitmap"] / 1e3,
        "pyroaring BitMap remove_range+add_range", ratio,
        [_req("speedup vs pyroaring BitMap", ratio, ">=", 10.0, "x")],
        {"others_us": {"roaring model": med["roaring_model"] / 1e3, "dense numpy": med["dense"] / 1e3},
         "ratio_vs_dense": med["dense"] / med["engine"],
         "repeats": len(fast["engine"]), "engine_counters_per_round_trip": work})


# -- target 2 -------------------------------------------------------------------------
def _block_calls(conv, nblocks, unit, shared_arg, private_arg):
    calls = []
    for b in range(nblocks):
        calls.append((conv, (b * unit, unit, shared_arg)))
        calls.append((conv, (b * unit, unit, private_arg)))
    return calls


def target2(quick):
    gm = W.engine()
    P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    nblocks = W.TIB // W.GIB
    g = W.engine_allocated()
    dm = W.dense_allocated()
    rm = W.roaring_allocated()
    ecalls = _block_calls(g.set_memory_attributes, nblocks, W.GIB, 0, P)
    dcalls = _block_calls(dm.convert, nblocks, W.PAGES_1G, False, True)
    rcalls = _block_calls(rm.convert, nblocks, W.PAGES_1G, False, True)
    for calls in (ecalls, dcalls, rcalls):
        for fn, args in calls[:2]:
            fn(*args)

    # correctness, outside the timing: split on the way out, merged on the way back
    c0 = dict(g.counters)
    for b in (0, 1, nblocks - 1):
        g.set_memory_attributes(b * W.GIB, W.GIB, 0)
        _check(g.folio_order(b * W.GIB) == 0 and g.folio_order((b + 1) * W.GIB - W.PAGE) == 0,
               f"T2: block {b} not split after conversion to shared")
        _check(g.private_pages() == W.TIB_PAGES - W.PAGES_1G, "T2: private page count after to-shared")
        if b:
            _check(g.folio_order(0) == 18, "T2: a neighbouring block was touched")
        g.set_memory_attributes(b * W.GIB, W.GIB, P)
        _check(g.folio_order(b * W.GIB) == 18, f"T2: block {b} not merged back")
    c1 = dict(g.counters)
    _check(c1["folio_splits_1g"] - c0["folio_splits_1g"] == 3, "T2: folio_splits_1g counter")
    _check(c1["folio_merges_1g"] - c0["folio_merges_1g"] == 3, "T2: folio_merges_1g counter")

    overhead = _timer_overhead_ns()
    e_samples, d_samples, r_samples, e_sweeps, d_sweeps = [], [], [], [], []
    for i in range(3 if quick else 7):
        s = _per_call_ns(ecalls)
        e_samples.append(s)
        e_sweeps.append(int(s.sum()))
        r_samples.append(_per_call_ns(rcalls))
        if i < (1 if quick else 3):
            s = _per_call_ns(dcalls)
            d_samples.append(s)
            d_sweeps.append(int(s.sum()))
    e = np.concatenate(e_samples)
    d = np.concatenate(d_samples)
    r = np.concatenate(r_samples)
    _check(g.private_pages() == W.TIB_PAGES, "T2: not all private after the sweeps")
    _check(all(g.folio_order(b * W.GIB) == 18 for b in range(nblocks)), "T2: not all merged after the sweeps")
    _check(dm.private_pages() == W.TIB_PAGES and dm.folio_order(0) == 18, "T2: dense model state")

    e_med, d_med = float(np.median(e)) / 1e3, float(np.median(d)) / 1e3
    ratio = d_med / e_med
    return _target(
        2, "1 TiB, 1 GiB backing, allocated: each 1 GiB block to shared and back (2048 calls)",
        "median us per call", e_med, d_med, "dense numpy model", ratio,
        [_req("median per call", e_med, "<=", 5.0, "us"),
         _req("speedup vs dense numpy", ratio, ">=", 8.0, "x")],
        {"engine_us_per_call_p90": float(np.percentile(e, 90)) / 1e3,
         "engine_sweep_ms_median": statistics.median(e_sweeps) / 1e6,
         "dense_sweep_ms_median": statistics.median(d_sweeps) / 1e6,
         "engine_to_shared_median_us": float(np.median(e[0::2])) / 1e3,
         "engine_to_private_median_us": float(np.median(e[1::2])) / 1e3,
         "others_us": {"roaring model": float(np.median(r)) / 1e3},
         "timer_overhead_ns": overhead, "calls_timed": int(e.size)})


# -- target 3 -------------------------------------------------------------------------
def target3(quick):
    gm = W.engine()
    P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    pages = W.swiotlb_pages()
    nconv = 2 * pages.size
    nblocks = W.TIB // W.GIB
    offs = pages * W.PAGE
    g = W.engine_allocated()
    many = g.set_memory_attributes_many

    # checked round, untimed
    c0 = dict(g.counters)
    r = many(offs, W.PAGE, 0)
    _check(not np.asarray(r.errno).any(), f"T3: batched to-shared errors {np.unique(r.errno)}")
    _check(g.private_pages() == W.TIB_PAGES - pages.size, "T3: private pages after to-shared")
    _check(all(g.folio_order(b * W.GIB) == 0 for b in range(nblocks)), "T3: a 1 GiB folio did not split")
    _check(not g.is_private(int(offs[0])), "T3: page not shared")
    r = many(offs, W.PAGE, P)
    _check(not np.asarray(r.errno).any(), f"T3: batched to-private errors {np.unique(r.errno)}")
    _check(g.private_pages() == W.TIB_PAGES, "T3: private pages after to-private")
    _check(all(g.folio_order(b * W.GIB) == 18 for b in range(nblocks)), "T3: a 1 GiB folio did not merge back")
    c1 = dict(g.counters)
    _check(c1["folio_splits_1g"] - c0["folio_splits_1g"] == nblocks, "T3: folio_splits_1g counter")
    _check(c1["folio_merges_1g"] - c0["folio_merges_1g"] == nblocks, "T3: folio_merges_1g counter")

    rm, roaring = W.roaring_churn(pages)

    batched = W.engine_churn(g, pages, batched=True)

    res = _interleaved({"batched": batched, "roaring": roaring}, 2 if quick else 5, min_sample_ns=0)
    _check(rm.private_pages() == W.TIB_PAGES and rm.splits == rm.merges and rm.splits % nblocks == 0
           and rm.splits and not rm.split, "T3: roaring model state")

    # one call at a time
    npc = 100_000 if quick else pages.size
    per_call = W.engine_churn(g, pages[:npc], batched=False)
    pc = [_timed(per_call) for _ in range(1 if quick else 3)]
    _check(g.private_pages() == W.TIB_PAGES and g.folio_order(0) == 18, "T3: per-call loop state")

    b_rate = nconv / (statistics.median(res["batched"]) / 1e9)
    r_rate = nconv / (statistics.median(res["roaring"]) / 1e9)
    pc_rate = 2 * npc / (statistics.median(pc) / 1e9)
    ratio = b_rate / r_rate
    return _target(
        3, "SWIOTLB churn: 500k random pages to shared, then back (1M conversions)",
        "conversions/s", b_rate, r_rate, "pyroaring model, one call per conversion", ratio,
        [_req("batched speedup vs pyroaring model", ratio, ">=", 10.0, "x"),
         _req("one call at a time", pc_rate, ">=", 400_000.0, "conv/s")],
        {"engine_per_call_rate": pc_rate, "engine_per_call_us": 1e6 / pc_rate,
         "per_call_conversions_timed": 2 * npc,
         "batched_ms_median": statistics.median(res["batched"]) / 1e6,
         "roaring_ms_median": statistics.median(res["roaring"]) / 1e6})


# -- target 4 (subprocesses) --------------------------------------------------------------
MEM_CASES = ("baseline_process", "engine_64t", "engine_1t_split", "roaring_64t", "roaring_1t_split",
             "dense_1t_split")


def _mem_child(case):
    """Runs in a fresh process: build the state, print one JSON line."""
    engine_case = case.startswith("engine") or case == "baseline_process"
    gm = W.warm_engine() if engine_case else None
    before = W.rss_bytes()
    warm_peak = W.peak_rss()
    reset = W.reset_peak_rss()
    t0 = time.perf_counter()
    keep = None
    if case == "engine_64t":
        keep = g = W.engine_allocated(64 * W.TIB)
        _check(g.folio_order(64 * W.TIB - W.PAGE) == 18 and g.private_pages() == 64 * W.TIB_PAGES, "64T state")
    elif case == "engine_1t_split":
        keep = g = W.engine_allocated()
        pages = W.split_pages()
        r = g.set_memory_attributes_many(pages * W.PAGE, W.PAGE, 0)
        _check(not np.asarray(r.errno).any(), "1T split: errors")
        _check(g.private_pages() == W.TIB_PAGES - pages.size, "1T split: private pages")
        _check(g.folio_order(0) == 0 and g.folio_order(W.TIB - W.PAGE) == 0, "1T split: not split")
        _check(g.counters["folio_splits_1g"] == W.TIB // W.GIB, "1T split: folio_splits_1g")
    elif case == "roaring_64t":
        keep = W.roaring_allocated(64 * W.TIB_PAGES)
    elif case in ("roaring_1t_split", "dense_1t_split"):
        keep = m = W.model_allocated(RoaringModel if case.startswith("roaring") else DenseModel)
        conv = m.to_shared_page
        for p in W.split_pages().tolist():
            conv(p)
        _check(m.folio_order(0) == 0 and m.splits == W.TIB // W.GIB, "model split")
    elif case != "baseline_process":
        raise ValueError(case)
    seconds = time.perf_counter() - t0
    peak = W.peak_rss()
    out = {"case": case, "rss_before": before, "warmup_peak": warm_peak,
           "peak_since_start": peak if reset else None,
           "process_peak": max(peak, warm_peak), "rss_after": W.rss_bytes(), "seconds": seconds}
    del keep, gm
    print(json.dumps(out))


def _run_mem_case(case, timeout=900):
    cmd = [sys.executable, "-m", "gmemfast.bench.targets", "--mem-child", case]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        return {"case": case, "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"],
                "stderr": p.stderr[-4000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def target4(quick):
    cases = {c: _run_mem_case(c) for c in MEM_CASES}
    for c, r in cases.items():
        if "error" in r:
            raise CheckFailed(f"T4 {c}: {r['error']}\n{r.get('stderr', '')}")
    e64, e1 = cases["engine_64t"], cases["engine_1t_split"]
    mib = lambda b: b / MIB  # noqa: E731
    return _target(
        4, "Memory: 64 TiB 1 GiB-backed allocated; 1 TiB split completely to 4 KiB",
        "MiB peak RSS (whole process)", {"64T": mib(e64["process_peak"]), "1T split": mib(e1["process_peak"])},
        {"64T": mib(cases["roaring_64t"]["process_peak"]), "1T split": mib(cases["roaring_1t_split"]["process_peak"])},
        "pyroaring model (same process layout)", None,
        [_req("64 TiB allocated peak RSS", mib(e64["process_peak"]), "<=", mib(TARGET_64T_BYTES), "MiB"),
         _req("1 TiB split to 4 KiB peak RSS", mib(e1["process_peak"]), "<=", mib(TARGET_1T_SPLIT_BYTES), "MiB")],
        {"cases": {c: {k: (mib(v) if k in ("rss_before", "warmup_peak", "peak_since_start", "process_peak", "rss_after")
                           and v is not None else v) for k, v in r.items()} for c, r in cases.items()},
         "note": "process_peak is the peak RSS (VmHWM) of a fresh process (imports, numba, kernels included); "
                 "peak_since_start - rss_before is the state alone (VmHWM reset after warm-up); "
                 "the baseline_process case is python + imports + warmed kernels and nothing else"})


# -- target 5 -------------------------------------------------------------------------
def target5(quick):
    """A 4 KiB split + merge round trip in a booted guest (SNP, TDX, sw-protected, each
    direct-map policy) against the same round trip on a bare file, same run."""
    gm = W.engine()
    P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    cases = {(pf, dm): W.booted_guest(pf, dm, churn=5_000 if quick else 20_000)[1]
             for pf in W.PLATFORMS for dm in W.DIRECT_MAPS}
    bare = W.bare_file()
    files = {**{f"{pf} {dm}": g for (pf, dm), g in cases.items()}, "bare file": bare}
    offs = W.roundtrip_pages(200 if quick else 1000).tolist()
    rt = W.split_merge_roundtrip
    before = {k: dict(g.counters) for k, g in files.items()}
    samples = {k: [] for k in files}
    for i in range(3 if quick else 7):
        for k, g in files.items():
            samples[k].append(_per_call_ns([(rt, (g, o, P)) for o in offs]))
    nrt = len(offs) * len(samples["bare file"])
    for k, g in files.items():      # every round trip split a 1 GiB folio and merged it back
        c = g.counters
        for name in ("folio_splits_1g", "folio_merges_1g"):
            _check(c[name] - before[k][name] == nrt, f"T5 {k}: {name} counted "
                   f"{c[name] - before[k][name]} for {nrt} round trips")
        _check(all(g.is_private(o) and g.folio_order(o) == 18 for o in offs[:20]),
               f"T5 {k}: pages not private and merged after the round trips")
        if k.endswith("on-conversion"):
            _check(c["dmap_entries_changed"] > before[k]["dmap_entries_changed"],
                   f"T5 {k}: the direct map never changed")
    med = {k: float(np.median(np.concatenate(v))) / 1e3 for k, v in samples.items()}
    base = med.pop("bare file")
    worst = max(med, key=med.get)
    return _target(
        5, "booted 16 GiB guest, 1 GiB pages, accepted at 2 MiB: a 4 KiB conversion to shared "
           "(splits the folio) and back (merges it), each platform and direct-map policy",
        "median us per round trip", med, base, "the same round trip on a bare file", med[worst] / base,
        [_req(f"round trip, {k}", v, "<=", 20.0, "us") for k, v in med.items()],
        {"worst": worst, "round_trips_timed_per_case": nrt})


# -- target 6 -------------------------------------------------------------------------
def target6(quick):
    """Every 4 KiB page of a 96 GiB guest accepted in random order through the batched
    form (quick: a 12 GiB guest, the time scaled to 96 GiB), against one call per page
    on a sample, same run."""
    gib = 12 if quick else 96
    size = gib * W.GIB
    vm, g = W.accept_guest(size)
    pages = np.random.default_rng(W.SWIOTLB_SEED).permutation(size // W.PAGE).astype(np.int64)
    c0 = dict(vm.counters)
    t = _timed(lambda: _check(W.accept_every_page(vm, pages) == 0, "T6: an accept failed"))
    c1 = dict(vm.counters)
    _check(c1["tdx_accepts"] - c0["tdx_accepts"] == pages.size, "T6: tdx_accepts != pages")
    _check(c1["pages_allocated"] - c0["pages_allocated"] == pages.size, "T6: pages_allocated != pages")
    _check(int(np.count_nonzero(g.te_states(0, 64 << 20) == 0)) == 0, "T6: a page is not accepted")
    # one call per page, on a fresh guest, a sample
    vm2, _g2 = W.accept_guest(size)
    sample = pages[:20_000].tolist()
    acc = vm2.guest_accept
    tc = _timed(lambda: [acc(p << 12, W.PAGE, chunk=W.PAGE) for p in sample])
    _check(vm2.counters["tdx_accepts"] == len(sample), "T6: per-call accepts")
    batched_rate = pages.size / (t / 1e9)
    call_rate = len(sample) / (tc / 1e9)
    at96 = (96 * W.GIB // W.PAGE) / batched_rate
    return _target(
        6, f"accept every 4 KiB page of a {gib} GiB TDX guest in random order (batched)",
        "accepts/s", batched_rate, call_rate, "one guest_accept call per page", batched_rate / call_rate,
        [_req("96 GiB, every 4 KiB page" + (" (scaled from 12 GiB)" if quick else ""), at96, "<=", 10.0, "s")],
        {"seconds": t / 1e9, "guest_gib": gib})


TARGETS = {1: target1, 2: target2, 3: target3, 4: target4, 5: target5, 6: target6}


def run(quick: bool = False, only=None, progress=None) -> dict:
    """Run the targets; returns {"machine": ..., "targets": [...], "passed": bool}."""
    gm = W.warm_engine()
    import numba
    import pyroaring
    out = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                       "cpus": os.cpu_count(), "numpy": np.__version__, "numba": numba.__version__,
                       "pyroaring": pyroaring.__version__,
                       "gmemfast": getattr(gm, "__version__", None)},
           "quick": quick, "targets": []}
    for tid, fn in TARGETS.items():
        if only and tid not in only:
            continue
        if progress:
            progress(f"target {tid} ...")
        t0 = time.perf_counter()
        try:
            t = fn(quick)
        except CheckFailed as e:
            t = {"id": tid, "title": fn.__name__, "passed": False, "error": f"check failed: {e}"}
        except Exception as e:  # engine exceptions are findings, not crashes of the runner
            import traceback
            t = {"id": tid, "title": fn.__name__, "passed": False,
                 "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        t["seconds"] = time.perf_counter() - t0
        out["targets"].append(t)
    out["passed"] = all(t["passed"] for t in out["targets"])
    return out


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        if v >= 1e5:
            return f"{v:,.0f}"
        return f"{v:.3g}" if v < 100 else f"{v:.1f}"
    return str(v)


def format_table(res) -> str:
    lines = [f"gmemfast targets ({'quick' if res['quick'] else 'full'} run; "
             f"{res['machine']['cpus']} CPUs, python {res['machine']['python']}, numba {res['machine']['numba']})", ""]
    for t in res["targets"]:
        head = f"[{'PASS' if t['passed'] else 'FAIL'}] target {t['id']}: {t['title']}"
        lines.append(head)
        if "error" in t:
            lines.append(f"    ERROR {t['error']}")
            continue
        lines.append(f"    {t['metric']}: engine {_fmt(t['engine'])} | {t['baseline_name']} {_fmt(t['baseline'])}"
                     + (f" | ratio {t['ratio']:.1f}x" if t['ratio'] is not None else ""))
        for c in t["checks"]:
            lines.append(f"    {'ok  ' if c['passed'] else 'MISS'} {c['name']}: {_fmt(c['value'])} {c['unit']} "
                         f"(target {c['op']} {_fmt(c['limit'])} {c['unit']}; value/target {c['margin']:.2f})")
        for k in ("others_us", "ratio_vs_dense", "engine_per_call_us", "engine_sweep_ms_median", "worst",
                  "engine_to_shared_median_us", "engine_to_private_median_us", "timer_overhead_ns"):
            if k in t:
                lines.append(f"    {k}: {_fmt(t[k])}")
        if "cases" in t:
            for c, r in t["cases"].items():
                state = (r["peak_since_start"] - r["rss_before"]) if r.get("peak_since_start") is not None else None
                lines.append(f"    {c:18s} process peak {r['process_peak']:8.1f} MiB | before {r['rss_before']:7.1f} MiB"
                             f" | state peak {_fmt(state)} MiB | {r['seconds']:.2f} s")
        lines.append(f"    ({t['seconds']:.1f} s)")
    lines.append("")
    lines.append("ALL TARGETS PASS" if res["passed"] else "SOME TARGETS MISS")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller per-call sample")
    ap.add_argument("--json", action="store_true", help="print machine-readable results")
    ap.add_argument("--only", default="", help="comma-separated target numbers, e.g. 1,3")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mem_child:
        _mem_child(a.mem_child)
        return 0
    only = {int(x) for x in a.only.split(",") if x.strip()} or None
    res = run(a.quick, only=only, progress=None if a.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=2) if a.json else format_table(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
