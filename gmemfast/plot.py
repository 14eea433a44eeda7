"""Pictures of scenario results (needs matplotlib: ``pip install 'gmemfast[plot]'``).

:func:`plot_result` draws one run: the estimated wall time of each operation (elapsed,
on the threads that run it), split in proportion to the CPU time of the counters that
cost the most, and over the run (x: operations done) the huge pages left and the direct
map's entries by size, with the run's stages marked. :func:`plot_compare` draws several
runs side by side. A panel with nothing to show (huge pages on 4 KiB backing) is left
out. :func:`plot_path` says which file a ``--plot`` argument names.
matplotlib is imported only when a plot is drawn, with the non-interactive Agg backend.
"""
from __future__ import annotations

import os
import re

__all__ = ["PlotError", "plot_compare", "plot_path", "plot_result", "plot_sweep", "require_matplotlib"]

_TOP = 7          # counters shown by name in the cost bars; the rest is "other"
_STEP_LABEL = "operations done (count)"


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


def plot_path(path, name: str) -> str:
    """The file ``--plot PATH`` writes: ``PATH`` itself, ``PATH/NAME.png`` when ``PATH``
    is a directory, ``PATH.png`` when it has no extension. ``ValueError`` when the folder
    does not exist or matplotlib cannot write that format."""
    path = os.fspath(path)
    if os.path.isdir(path):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "plot"
        path = os.path.join(path, stem + ".png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--plot {path}: folder {folder} is not writable")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not ext:
        return path + ".png"
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise ValueError(f"--plot {path}: matplotlib cannot write .{ext} files (it writes "
                         f"{', '.join('.' + f for f in sorted(formats))})")
    return path


def _time_unit(max_ns):
    for scale, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if max_ns >= scale:
            return scale, unit
    return 1.0, "ns"


def _cost_bars(ax, estimates, labels, title, ylabel, walls=None, limits=None):
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
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if top:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
                  frameon=False, title="counters (largest CPU time first)", title_fontsize="small")
    from .report import format_ns
    for y, est, w, lim in zip(ys, estimates, walls, limits):
        note = f" wall {format_ns(w)}"
        if abs(w - est.total_ns) > 1e-6 * max(w, 1.0):
            note += f" (cpu {format_ns(est.total_ns)}" + (f", {lim}" if lim else "") + ")"
        ax.text(w / scale, y, note, va="center", fontsize="small")
    ax.margins(x=0.3)


def _count_axis(axis, log=False):
    """Readable counts on an axis: 0, 1, 10, 100, 1k, 10k, 1M (log: powers of ten only)."""
    from matplotlib.ticker import EngFormatter, MaxNLocator, NullLocator, SymmetricalLogLocator
    axis.set_major_formatter(EngFormatter(sep="", places=0 if log else None))
    if log:
        axis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1, subs=[1.0]))
        axis.set_minor_locator(NullLocator())
    else:
        axis.set_major_locator(MaxNLocator(5, integer=True))


def _mark_stages(ax, marks):
    """The run's stages: a dotted line where each starts, shading every other one."""
    # of marks at the same step (a step of a file and the stage it starts), the last
    marks = [m for i, m in enumerate(marks) if i + 1 == len(marks) or marks[i + 1]["step"] != m["step"]]
    if not marks:
        return
    import matplotlib.transforms as mtransforms
    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    end = ax.get_xlim()[1]
    for i, m in enumerate(marks):
        x = m["step"]
        nxt = marks[i + 1]["step"] if i + 1 < len(marks) else end
        if i % 2 and nxt > x:
            ax.axvspan(x, nxt, color="0.93", zorder=0, linewidth=0)
        ax.axvline(x, color="0.5", linestyle=":", linewidth=0.8, zorder=1)
        ax.text(x, 0.98, " " + m["label"], transform=trans, rotation=90, va="top", ha="left",
                fontsize="x-small", color="0.35")


def _shared_marks(runs):
    """The stage marks to draw: the runs', when all runs have the same ones."""
    first = runs[0].marks if runs else []
    return first if all(r.marks == first for r in runs) else []


def _huge_panel(ax, series, marks):
    for label, tl in series:
        ax.plot([s["step"] for s in tl], [s["huge_pages"] for s in tl], label=label,
                drawstyle="steps-post")
    ax.set_title("huge pages left")
    ax.set_xlabel(_STEP_LABEL)
    ax.set_ylabel("huge folios (count)")
    ax.set_ylim(bottom=0)
    _count_axis(ax.xaxis)
    _count_axis(ax.yaxis)
    if len(series) > 1:
        ax.legend(fontsize="small")
    _mark_stages(ax, marks)


def _dmap_panel(ax, series, marks):
    if len(series) == 1:
        (_label, tl), = series
        steps = [s["step"] for s in tl]
        for key, style in (("dmap_4k", "-"), ("dmap_2m", "--"), ("dmap_1g", ":")):
            ax.plot(steps, [max(s[key], 0) for s in tl], style, label=key[5:].upper() + " entries")
        ax.set_title("direct-map entries by size")
    else:        # one line per run: all entries (the 4K ones dominate once fragmented)
        for label, tl in series:
            ax.plot([s["step"] for s in tl], [s["dmap_1g"] + s["dmap_2m"] + s["dmap_4k"] for s in tl],
                    label=label)
        ax.set_title("direct-map entries (all sizes)")
    ax.set_xlabel(_STEP_LABEL)
    ax.set_ylabel("entries (count, log scale)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    _count_axis(ax.xaxis)
    _count_axis(ax.yaxis, log=True)
    ax.legend(fontsize="small")
    _mark_stages(ax, marks)


def _figure(results, series):
    """A figure with the cost panel and the timeline panels that have something to show."""
    plt = require_matplotlib()
    with_huge = any(r.summary.get("huge_pages_max") for r in results)
    n = 3 if with_huge else 2
    fig, axes = plt.subplots(1, n, figsize=(6 + 5.5 * (n - 1), 5.4),
                             gridspec_kw={"width_ratios": [1.5] + [1] * (n - 1)})
    marks = _shared_marks(results)
    if with_huge:
        _huge_panel(axes[1], [(lab, tl) for (lab, tl), r in zip(series, results)
                              if r.summary.get("huge_pages_max")], marks)
    _dmap_panel(axes[-1], series, marks)
    return plt, fig, axes


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_result(result, path) -> None:
    """Save a picture of one ScenarioResult to ``path`` (format from the extension)."""
    plt, fig, axes = _figure([result], [(result.name, result.timeline)])
    est = result.estimate
    ops = list(est.by_operation.items()) or [("total", est)]
    wall = getattr(result, "wall", None)
    walls = [wall.phases[o].wall_ns if wall is not None and o in wall.phases else e.total_ns for o, e in ops]
    limits = [wall.phases[o].limit if wall is not None and o in wall.phases else None for o, _ in ops]
    vcpus = result.params.get("vcpus", 1)
    _cost_bars(axes[0], [e for _, e in ops], [o for o, _ in ops],
               f"estimated wall time by operation ({vcpus} vCPU{'s' if vcpus != 1 else ''})", "operation",
               walls, limits)
    p = result.params
    size = p.get("size")
    from .units import format_size
    fig.suptitle(f"gmemfast {result.name}: {p.get('platform')}, size "
                 f"{format_size(int(size)) if size else '-'}, page order {p.get('page_order')}, "
                 f"direct map {p.get('direct_map')}, tracking {p.get('tracking')}, profile {est.profile}")
    _save(plt, fig, path)


def plot_compare(results, labels, path) -> None:
    """Save a picture of several results of one scenario, one per label."""
    plt, fig, axes = _figure(results, [(lab, r.timeline) for lab, r in zip(labels, results)])
    _cost_bars(axes[0], [r.estimate for r in results], labels, "estimated total wall time",
               "configuration", [getattr(r, "wall_ns", r.total_ns) for r in results])
    fig.suptitle(f"gmemfast compare {results[0].name}")
    _save(plt, fig, path)


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
    _save(plt, fig, path)
