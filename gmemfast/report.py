"""Every text table the project prints, and the formats of durations and sizes in them.

The functions take plain results (an ``Estimate``, a ``ScenarioResult``, dicts) and
return text; they import nothing above them, so any module can print through them.
"""
from __future__ import annotations

import textwrap

from .units import format_size

__all__ = ["format_ns", "format_size_short", "table", "estimate_table", "describe_guest",
           "format_result", "format_compare", "format_scenarios", "format_counters", "format_sweep", "failures_text",
           "TERMS"]

#: What the words of a run's report mean.
TERMS = ("operations: the calls the run made on guest memory (each conversion, fallocate, host "
         "access, pin and unpin, launch run and legacy set-private call, and each 4K or 2M piece "
         "the guest accepted); errors: the operations that failed, by errno")

_GUEST_KEYS = ("size", "platform", "page_order", "direct_map", "tracking", "flow", "merge")
_ORDER_NAMES = {0: "4K", 9: "2M", 18: "1G"}


def format_ns(ns: float) -> str:
    """A duration in human units with three significant digits: '812 ns', '3.40 µs', '26.0 s'."""
    if ns == 0:
        return "0 ns"
    # pick the unit after rounding, so that 999.7 ns reads '1.00 µs', not '1.00e+03 ns'
    scale, unit = next(
        ((s, u) for s, u in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")) if abs(ns) >= 0.9995 * s), (1.0, "ns")
    )
    value = ns / scale
    if abs(value) >= 999.5:  # only seconds get this large
        return f"{value:,.0f} {unit}"
    return f"{value:#.3g}".rstrip(".") + f" {unit}"


def format_size_short(n) -> str:
    """Bytes in binary units: exact when short ('4T', '1536M'), else three digits ('19.5M')."""
    if not n:
        return "0"
    exact = format_size(n)
    if len(exact) <= 5:            # up to four digits and a unit
        return exact
    for unit, mult in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult:
            v = n / mult
            return (f"{v:.0f}" if v >= 100 else f"{v:#.3g}".rstrip(".")) + unit
    return exact


def table(rows, header=None, align=None, *, rule_after=()) -> str:
    """Aligned columns: first column left, the others right (or per ``align``, a string
    of ``l``/``r``). A rule follows the header and each row index in ``rule_after``."""
    rows = [[str(c) for c in r] for r in rows]
    allr = ([list(header)] if header else []) + rows
    if not allr:
        return ""
    ncol = max(len(r) for r in allr)
    allr = [r + [""] * (ncol - len(r)) for r in allr]
    widths = [max(len(r[i]) for r in allr) for i in range(ncol)]
    align = align or ("l" + "r" * (ncol - 1))
    rule = "  ".join("-" * w for w in widths)

    def line(r):
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        return "  ".join(cells).rstrip()

    out = []
    if header:
        out.append(line(allr[0]))
        out.append(rule)
        allr = allr[1:]
    for i, r in enumerate(allr):
        out.append(line(r))
        if i in rule_after:
            out.append(rule)
    return "\n".join(out)


def estimate_table(est) -> str:
    """An ``Estimate`` as a table: counter, count, ns each, total, share, most expensive
    first; unpriced counters named below the total; then the per-operation summary."""
    def share(ns: float) -> str:
        return f"{100.0 * ns / est.total_ns:.1f}%" if est.total_ns else "-"

    rows = [(name, f"{est.counts[name]:,}",
             format_ns(est.ns_each[name]) if name in est.ns_each else "unpriced",
             format_ns(ns), share(ns))
            for name, ns in est.by_counter.items()]
    if not rows:
        rows = [("(no work counted)", "", "", "", "")]
    rows.append(("total", "", "", format_ns(est.total_ns), share(est.total_ns)))
    out = [f"cost profile: {est.profile}",
           table(rows, ("counter", "count", "ns each", "total", "share"), rule_after=(len(rows) - 2,))]
    if est.unpriced:
        out.append(f"unpriced (no figure in profile {est.profile!r}, counted as 0): "
                   + ", ".join(est.unpriced))
    if est.by_operation:
        ops = [(op, format_ns(e.total_ns), share(e.total_ns)) for op, e in est.by_operation.items()]
        out.append("")
        out.append(table(ops, ("operation", "total", "share"), "lrr"))
    return "\n".join(out)


def describe_guest(params: dict) -> str:
    """One line naming the guest a scenario ran on."""
    p = params
    order = _ORDER_NAMES.get(p.get("page_order"), p.get("page_order"))
    parts = [p.get("platform"), format_size_short(p.get("size", 0)), f"{order} pages",
             f"direct map {p.get('direct_map')}", f"tracking {p.get('tracking')}",
             f"flow {p.get('flow')}"]
    if p.get("merge") != "eager":
        parts.append(f"merge {p.get('merge')}")
    return ", ".join(str(x) for x in parts)


def huge_pages_text(summary: dict) -> str:
    """'3 of 1,024', or '- (4K backing)' where the file has no huge pages at all."""
    if summary["huge_pages_max"]:
        return f"{summary['huge_pages_left']:,} of {summary['huge_pages_max']:,}"
    return "- (4K backing)"


def errors_text(summary: dict) -> str:
    """'EAGAIN 1', with whether those were the failures the scenario expects."""
    text = ", ".join(f"{k} {v:,}" for k, v in summary["errors"].items()) or "none"
    expected = summary.get("expected_errors")
    if expected is None:
        return text
    if dict(summary["errors"]) == expected:
        return f"{text} (as expected)"
    want = ", ".join(f"{k} {v:,}" for k, v in expected.items()) or "none"
    return f"{text} (expected {want})"


def failures_text(summary: dict) -> list[str]:
    """The first failed operation of each kind: where, what, errno (one line each)."""
    out = []
    for f in summary.get("failures", []):
        at = f" at {f['error_offset']:#x}" if f.get("error_offset") is not None else ""
        times = f" (x{f['count']:,})" if f["count"] > 1 else ""
        out.append(f"  {f['errno']}{times}: {f['op']} [{f['offset']:#x}, +{f['size']:#x}){at}, "
                   f"first at {f['where']}")
    return out


def _wall_of(res, op: str):
    """(wall ns, threads, limit) of one phase of a result, or the CPU time on one thread
    for a result without wall times."""
    wall = getattr(res, "wall", None)
    if wall is not None and op in wall.phases:
        ph = wall.phases[op]
        return ph.wall_ns, ph.threads, ph.limit
    e = res.estimate.by_operation.get(op)
    return (e.total_ns if e else 0.0), 1, "threads"


def _vcpus(res) -> int:
    return int(res.params.get("vcpus", 1) or 1)


def format_result(res, *, top: int = 15) -> str:
    """The readable report of one scenario result."""
    est = res.estimate
    total = est.total_ns
    share = (lambda ns: f"{100 * ns / total:.1f}%") if total else (lambda ns: "-")
    wall_total = getattr(res, "wall_ns", total)
    vcpus = _vcpus(res)
    out = [f"scenario {res.name}: {res.description}",
           f"guest: {describe_guest(res.params)}",
           f"cost profile: {est.profile}    vCPUs: {vcpus}    model run time: {res.wall_seconds:.2f} s", "",
           f"estimated wall time {format_ns(wall_total)} on {vcpus} vCPU{'s' if vcpus != 1 else ''}   "
           f"cpu time {format_ns(total)}",
           "(wall: elapsed time, each phase on the threads that run it; cpu: all work on every "
           "thread, the sum of the counters below)", ""]
    if getattr(res, "cost_source", ""):
        out.insert(3, f"cost figures: {res.cost_source}")
    shown = res.params_shown or {k: str(v) for k, v in res.params.items()}
    extra_params = {k: v for k, v in shown.items() if k not in _GUEST_KEYS}
    if extra_params:
        out.insert(2, "parameters: " + ", ".join(f"{k}={v}" for k, v in extra_params.items()))
    rows = []
    for op, e in est.by_operation.items():
        w, threads, limit = _wall_of(res, op)
        rows.append([op, str(threads), format_ns(w), format_ns(e.total_ns), share(e.total_ns), limit,
                     next(iter(e.by_counter), "")])
    rows.append(["total", "", format_ns(wall_total), format_ns(total), share(total) if total else "-", "", ""])
    out.append("estimated time by operation")
    out.append(table(rows, ["operation", "threads", "wall", "cpu", "cpu share", "limited by", "largest cost"],
                     "lrrrrll"))
    out.append("")
    crow = []
    items = list(est.by_counter.items())
    for name, ns in items[:top]:
        each = est.ns_each.get(name)
        crow.append([name, f"{est.counts[name]:,}", format_ns(each) if each is not None else "unpriced",
                     format_ns(ns), share(ns)])
    out.append("counters")
    out.append(table(crow, ["counter", "count", "each", "time", "share"]) if crow else "(no work counted)")
    if len(items) > top:
        rest = items[top:]
        out.append(f"... and {len(rest)} more counters costing {format_ns(sum(ns for _, ns in rest))} "
                   "(--json lists all)")
    if est.unpriced:
        out.append("unpriced (counted as 0): " + ", ".join(est.unpriced))
    s = res.summary
    dm = s["direct_map"]
    srows = [
        ["private pages", f"{s['private_pages']:,}", format_size_short(s["private_pages"] * 4096)],
        ["shared pages", f"{s['shared_pages']:,}", format_size_short(s["shared_pages"] * 4096)],
        ["allocated pages", f"{s['allocated_pages']:,}", format_size_short(s["allocated_pages"] * 4096)],
        ["huge pages left", huge_pages_text(s), ""],
        ["direct-map entries", f"{s['direct_map_entries']:,}",
         f"1G {dm['1G']:,} / 2M {dm['2M']:,} / 4K {dm['4K']:,}"],
        ["mapped at 4K", format_size_short(s["direct_map_4k_bytes"]),
         f"{100 * s['direct_map_4k_bytes'] / s['guest_size']:.2f}% of memory"],
        ["attribute ranges", f"{s['attribute_ranges']:,}", ""],
        ["operations", f"{s['operations']:,}", ""],
        ["errors", errors_text(s), ""],
    ]
    out.append("")
    out.append("final state")
    out.append(table(srows, align="lrl"))
    failed = failures_text(s)
    if failed:
        out.append("failed operations (the first of each kind):")
        out.extend(failed)
    out.append("")
    out.extend(textwrap.wrap(TERMS, 100))
    if "measurement" in res.extra:
        out.append("")
        out.append(f"{res.extra['measurement_kind']}: {res.extra['measurement']}"
                   + (f"  ({res.extra['measured_with']})" if res.extra.get("measured_with") else ""))
    figures = res.extra.get("figures")
    if figures:
        out.append("")
        out.append(f"{res.name}")
        out.append(table([[k, str(v)] for k, v in figures.items()], align="ll"))
    return "\n".join(out)


def format_compare(results, labels, *, top: int = 12) -> str:
    """Results of one scenario side by side: one column per configuration. The first
    rows are wall times (elapsed, per phase on its threads), then CPU times."""
    header = ["", *labels]
    walls = [getattr(r, "wall_ns", r.total_ns) for r in results]
    rows = [["wall time (elapsed)", *[format_ns(w) for w in walls]]]
    ops: list[str] = []
    for r in results:                  # every run's operations, each in its run's order
        prev = -1
        for op in r.estimate.by_operation:
            if op in ops:
                prev = ops.index(op)
            else:
                prev += 1
                ops.insert(prev, op)
    for op in ops:
        cells = []
        for r in results:
            if op in r.estimate.by_operation:
                w, _t, limit = _wall_of(r, op)
                cells.append(f"{format_ns(w)} ({limit})" if limit != "threads" else format_ns(w))
            else:
                cells.append("-")
        rows.append([f"  {op}", *cells])
    base = walls[0]
    if base:
        rows.append(["relative wall time", *[f"{w / base:.2f}x" for w in walls]])
    rows.append(["vCPUs", *[str(_vcpus(r)) for r in results]])
    rows.append(["cpu time (all work)", *[format_ns(r.total_ns) for r in results]])
    for op in ops:
        rows.append([f"  {op}", *[format_ns(r.estimate.by_operation[op].total_ns)
                                  if op in r.estimate.by_operation else "-" for r in results]])
    rows.append(["huge pages left", *[huge_pages_text(r.summary) for r in results]])
    for key, label in (("private_pages", "private pages"), ("allocated_pages", "allocated pages"),
                       ("direct_map_entries", "direct-map entries"),
                       ("attribute_ranges", "attribute ranges"), ("operations", "operations")):
        rows.append([label, *[f"{r.summary[key]:,}" for r in results]])
    rows.append(["direct map 1G/2M/4K", *["/".join(f"{r.summary['direct_map'][k]:,}" for k in ("1G", "2M", "4K"))
                                          for r in results]])
    rows.append(["errors", *[errors_text(r.summary) for r in results]])
    figures: list[str] = []            # what the scenario reports of itself, in its order
    for r in results:
        figures += [k for k in r.extra.get("figures", {}) if k not in figures]
    for key in figures:
        rows.append([key, *[str(r.extra.get("figures", {}).get(key, "-")) for r in results]])
    rows.append(["model run time", *[f"{r.wall_seconds:.2f} s" for r in results]])
    out = [f"scenario {results[0].name}: {results[0].description}",
           "wall: estimated elapsed time, each phase on the threads that run it (in brackets: the "
           "resource that limits it, when not the threads); cpu: all work on every thread",
           table(rows, header), *textwrap.wrap(TERMS, 100)]
    sources = {getattr(r, "cost_source", "") for r in results} - {""}
    if len(sources) == 1:
        out.append(f"cost figures: {sources.pop()}")
    out.append("")
    # the counters that cost the most anywhere, where the configurations differ
    worst: dict[str, float] = {}
    for r in results:
        for name, ns in r.estimate.by_counter.items():
            worst[name] = max(worst.get(name, 0.0), ns)
    names = [n for n in sorted(worst, key=lambda n: -worst[n])
             if len({r.counters.get(n, 0) for r in results}) > 1][:top]
    if names:
        crow = [[n, *[f"{r.counters.get(n, 0):,}" for r in results]] for n in names]
        out.append("counters that differ (most expensive first)")
        out.append(table(crow, ["counter", *labels]))
    measured = [r.extra.get("measurement") for r in results]
    if any(measured):
        out.append("")
        if len(set(measured)) == 1:
            out.append(f"measurement: identical in every configuration: {measured[0]}")
        else:
            out.append("measurements differ: " + ", ".join(f"{lab}: {(m or '-')[:16]}..."
                                                          for lab, m in zip(labels, measured)))
    return "\n".join(out)


def format_scenarios(scenarios, common) -> str:
    """The scenario list of ``gmemfast scenarios``: each scenario and its parameters."""
    out = [table([[s.name, s.description] for s in scenarios], ["scenario", "what it does"], "ll"), "",
           "common parameters (options of run and compare):",
           table([["--" + k.replace("_", "-"), p.show(p.default), p.help] for k, p in common.items()],
                 ["option", "default", ""], "lll")]
    for s in scenarios:
        out.append("")
        out.append(f"{s.name}: {s.description}")
        rows = [["--" + k.replace("_", "-"), s.all_params()[k].show(v), "(default override)"]
                for k, v in s.defaults.items()]
        rows += [["--" + k.replace("_", "-"), p.show(p.default), p.help] for k, p in s.params.items()]
        if rows:
            out.append(table(rows, align="lll"))
    out.append("")
    out.append("A .toml scenario file or a .csv/.jsonl trace can stand in for a scenario name "
               "(formats: examples/README.md).")
    return "\n".join(out)


def format_sweep(rows, swept) -> str:
    """The rows of a sweep (dicts), fastest first by estimated wall time (CPU time when
    the rows have none); failed configurations last, with their errors."""
    timed = any(r.get("wall_ns") is not None for r in rows if r.get("error") is None)
    key = "wall_ns" if timed else "cpu_ns"
    ok = sorted((r for r in rows if r.get("error") is None), key=lambda r: r[key])
    bad = [r for r in rows if r.get("error") is not None]
    header = ["configuration", *(["wall time"] if timed else []), "CPU time", "huge pages left",
              "direct map 1G/2M/4K", "mapped at 4K", "attr ranges", "errors", "model s"]
    out = []
    for r in ok:
        huge = f"{r.get('huge_pages_left', 0):,}/{r['huge_pages_max']:,}" if r.get("huge_pages_max") else "-"
        dmap = "/".join(f"{r.get('dmap_' + k) or 0:,}" for k in ("1g", "2m", "4k"))
        out.append([r.get("config") or "(defaults)", *([format_ns(r["wall_ns"])] if timed else []),
                    format_ns(r["cpu_ns"]), huge, dmap, format_size_short(r.get("direct_map_4k_bytes") or 0),
                    f"{r.get('attribute_ranges', 0):,}", f"{r.get('errors', 0):,}",
                    f"{r['run_seconds']:.2f}" if r.get("run_seconds") is not None else "-"])
    text = [f"{len(rows)} configurations swept over {', '.join(swept) or 'nothing'}, "
            f"by estimated {'wall' if timed else 'CPU'} time", table(out, header)]
    if bad:
        text.append("")
        text.append(f"failed ({len(bad)})")
        text.append(table([[r.get("config") or "(defaults)", r["error"]] for r in bad], align="ll"))
    return "\n".join(text)


def format_counters(rows, profile=None, description="") -> str:
    """The counter list of ``gmemfast counters``: each counter and what one count is
    (``rows``: dicts with name, unit and, for a profile, ns and source)."""
    if profile is None:
        out = [table([[r["name"], r["unit"]] for r in rows], ["counter", "unit (what one count is)"], "ll"),
               "",
               f"{len(rows)} counters. A cost profile gives each a figure in ns per unit: "
               "gmemfast counters --profile snp|tdx|sw-protected|FILE lists the figures and their sources."]
        return "\n".join(out)
    out = [f"cost profile: {profile}" + (f": {description}" if description else ""),
           "figures in ns per unit; a counter without a figure costs nothing and is reported as unpriced", ""]
    for r in rows:
        figure = format_ns(r["ns"]) if r.get("ns") is not None else "unpriced"
        out.append(f"{r['name']}: {figure} per {r['unit']}")
        if r.get("source"):
            out.append(f"    source: {r['source']}")
    return "\n".join(out)
