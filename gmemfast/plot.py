"""Pictures of scenario results (needs matplotlib: ``pip install 'gmemfast[plot]'``).

:func:`plot_result` draws one run: the estimated wall time of each operation (elapsed,
on the threads that run it), split in proportion to the CPU time of the counters that
cost the most, and over the run's steps the huge pages left and the direct map's
entries by size. :func:`plot_compare` draws several runs side by side.
matplotlib is imported only when a plot is drawn, with the non-interactive Agg backend.
"""
from __future__ import annotations

__all__ = ["PlotError", "plot_result", "plot_compare", "plot_sweep", "require_matplotlib"]

_TOP = 7          # counters shown by name in the cost bars; the rest is "other"


class PlotError(ImportError):
    """matplotlib is missing."""


def require_matplotlib():
    """Return ``matplotlib.pyplot`` (Agg backend), or raise PlotError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: install it with pip install 'gmemfast[plot]' "
                        "(or pip install matplotlib)") from None
    return plt


def _time_unit(max_ns):
    for scale, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if max_ns >= scale:
            return scale, unit
    return 1.0, "ns"


def _cost_bars(ax, estimates, labels, title, walls=None, limits=None):
    """Horizontal bars, one per label, as long as the wall time (``walls``, default the
    CPU time), stacked by the most expensive counters in proportion to their CPU time."""
    walls = [e.total_ns for e in estimates] if walls is None else list(walls)
    limits = [None] * len(estimates) if limits is None else list(limits)
    totals: dict[str, float] = {}
    for est in estimates:
        for name, ns in est.by_counter.items():
            totals[name] = totals.get(name, 0.0) + ns
    top = [n for n in sorted(totals, key=lambda n: -totals[n]) if totals[n] > 0][:_TOP]
    biggest = max(walls, default=0.0)
    scale, unit = _time_unit(biggest)
    import matplotlib
    colors = matplotlib.colormaps["tab10"]
    left = [0.0] * len(estimates)
    ys = list(range(len(estimates)))
    # each bar is its wall time; its counters share it as they share the CPU time
    fold = [w / e.total_ns if e.total_ns else 0.0 for w, e in zip(walls, estimates)]
    for k, name in enumerate(top + ["other"]):
        widths = []
        for est, f in zip(estimates, fold):
            if name == "other":
                widths.append(f * sum(ns for n, ns in est.by_counter.items() if n not in top) / scale)
            else:
                widths.append(f * est.by_counter.get(name, 0.0) / scale)
        if any(widths):
            ax.barh(ys, widths, left=left, color=colors(k % 10) if name != "other" else "0.7",
                    label=name, edgecolor="white", linewidth=0.5)
            left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"estimated wall time ({unit}); bars split by the counters' share of CPU time")
    ax.set_title(title)
    if top:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
                  frameon=False)
    from .report import format_ns
    for y, est, w, lim in zip(ys, estimates, walls, limits):
        note = f" wall {format_ns(w)}"
        if abs(w - est.total_ns) > 1e-6 * max(w, 1.0):
            note += f" (cpu {format_ns(est.total_ns)}" + (f", {lim}" if lim else "") + ")"
        ax.text(w / scale, y, note, va="center", fontsize="small")
    ax.margins(x=0.3)


def _timeline_axes(ax_huge, ax_dmap, series):
    """series: list of (label, timeline, huge_max)."""
    any_huge = False
    for label, tl, huge_max in series:
        if not tl:
            continue
        steps = [s["step"] for s in tl]
        if huge_max:
            any_huge = True
            ax_huge.plot(steps, [s["huge_pages"] for s in tl], label=label, drawstyle="steps-post")
        if len(series) == 1:
            for key, style in (("dmap_4k", "-"), ("dmap_2m", "--"), ("dmap_1g", ":")):
                ax_dmap.plot(steps, [max(s[key], 0) for s in tl], style, label=key[5:].upper())
        else:        # one line per run: all entries (the 4K ones dominate once fragmented)
            ax_dmap.plot(steps, [s["dmap_1g"] + s["dmap_2m"] + s["dmap_4k"] for s in tl], label=label)
    from matplotlib.ticker import EngFormatter, MaxNLocator
    for ax in (ax_huge, ax_dmap):
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax_huge.set_title("huge pages left")
    ax_huge.set_xlabel("step (operations)")
    if any_huge:
        ax_huge.legend(fontsize="small") if len(series) > 1 else None
        ax_huge.set_ylim(bottom=0)
    else:
        ax_huge.text(0.5, 0.5, "4 KiB backing: no huge pages", ha="center", va="center",
                     transform=ax_huge.transAxes)
    ax_dmap.set_title("direct-map entries by size" if len(series) == 1 else "direct-map entries (all sizes)")
    ax_dmap.set_xlabel("step (operations)")
    ax_dmap.set_yscale("symlog", linthresh=1)
    ax_dmap.legend(fontsize="small")


def plot_result(result, path) -> None:
    """Save a picture of one ScenarioResult to ``path`` (format from the extension)."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    est = result.estimate
    ops = list(est.by_operation.items()) or [("total", est)]
    wall = getattr(result, "wall", None)
    walls = [wall.phases[o].wall_ns if wall is not None and o in wall.phases else e.total_ns for o, e in ops]
    limits = [wall.phases[o].limit if wall is not None and o in wall.phases else None for o, _ in ops]
    vcpus = result.params.get("vcpus", 1)
    _cost_bars(axes[0], [e for _, e in ops], [o for o, _ in ops],
               f"estimated wall time by operation ({vcpus} vCPU{'s' if vcpus != 1 else ''})", walls, limits)
    _timeline_axes(axes[1], axes[2], [(result.name, result.timeline, result.summary.get("huge_pages_max"))])
    p = result.params
    fig.suptitle(f"gmemfast {result.name}: {p.get('platform')}, size {p.get('size') and _size(p['size'])}, "
                 f"page order {p.get('page_order')}, direct map {p.get('direct_map')}, "
                 f"tracking {p.get('tracking')}, profile {est.profile}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(results, labels, path) -> None:
    """Save a picture of several results of one scenario, one per label."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    _cost_bars(axes[0], [r.estimate for r in results], labels, "estimated total wall time",
               [getattr(r, "wall_ns", r.total_ns) for r in results])
    _timeline_axes(axes[1], axes[2], [(lab, r.timeline, r.summary.get("huge_pages_max"))
                                      for lab, r in zip(labels, results)])
    fig.suptitle(f"gmemfast compare {results[0].name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _size(n):
    from .units import format_size
    return format_size(int(n))



def plot_sweep(rows, swept, path, *, title="gmemfast sweep") -> None:
    """Save a picture of a sweep's rows (dicts): for each swept parameter, estimated wall
    time (CPU time when the rows have none) and huge pages left against its values, one
    line per value of the next swept parameter, the median over the others."""
    plt = require_matplotlib()
    from statistics import median
    ok = [r for r in rows if r.get("error") is None]
    key = "wall_ns" if any(r.get("wall_ns") is not None for r in ok) else "cpu_ns"
    swept = list(swept) or ["config"]
    fig, axes = plt.subplots(2, len(swept), figsize=(5.5 * len(swept), 8), squeeze=False)
    scale, unit = _time_unit(max((r[key] for r in ok), default=0.0))
    for j, name in enumerate(swept):
        other = swept[(j + 1) % len(swept)] if len(swept) > 1 else None
        xs = list(dict.fromkeys(r[name] for r in rows))
        groups = list(dict.fromkeys(r[other] for r in rows)) if other else [None]
        for row_i, (metric, label) in enumerate(((key, f"estimated {key[:-3]} time ({unit})"),
                                                 ("huge_pages_left", "huge pages left"))):
            ax = axes[row_i][j]
            for g in groups:
                ys = []
                for x in xs:
                    vals = [r[metric] for r in ok if r[name] == x and (other is None or r[other] == g)
                            and r.get(metric) is not None]
                    ys.append(median(vals) / (scale if metric == key else 1) if vals else float("nan"))
                ax.plot(range(len(xs)), ys, marker="o", label=f"{other}={g}" if other else None)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlabel(name)
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            if other:
                ax.legend(fontsize="small")
    fig.suptitle(title + ("  (median over the other parameters)" if len(swept) > 2 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
