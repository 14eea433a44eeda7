"""The ``gmemfast`` command.

::

    gmemfast run SCENARIO [options]        a built-in scenario, a .toml file or a trace
    gmemfast compare SCENARIO --vary KEY=A,B [options]   side by side under policies
    gmemfast launch snp|tdx [--ovmf FILE]  launch measurement and its cost
    gmemfast scenarios                     list the scenarios and their parameters
    gmemfast sweep SCENARIO --grid KEY=A,B --out FILE.parquet   every combination, on Dask
    gmemfast counters [--profile P]        every counter, its unit, figure and source

Exit status (:data:`EXIT_STATUSES`): 0 when every operation succeeded (or exactly the
failures a scenario file declares it expects happened); 1 when operations failed (the
report names the first of each kind; ``--strict`` stops at the first); 2 for bad input,
printed as one line on stderr and changing nothing (no output file is left behind);
130 on Ctrl-C.

Subcommands come from the table :data:`COMMANDS` (a :class:`Command` per entry: name,
help, a function adding its arguments, a function running it; either may be given as
``"module:function"`` and is then imported only when used). Add one with
:func:`register_command` or by appending to the table.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from .report import (errors_text, format_compare, format_counters, format_ns, format_result,
                     format_scenarios)

__all__ = ["COMMANDS", "Command", "EXIT_STATUSES", "Progress", "main", "register_command", "build_parser"]

#: What the command's exit status means.
EXIT_STATUSES = {
    0: "success: every operation succeeded, or exactly the failures the scenario expects",
    1: "operations failed (the report names the first of each kind), a bench target was missed, "
       "or an output file could not be written",
    2: "bad input (an option, a scenario file, a trace): one line on stderr, nothing written",
    130: "interrupted (Ctrl-C)",
}


class UsageError(Exception):
    """A bad option value found after parsing: printed, exit status 2."""


# ============================================================================ progress

class Progress:
    """A one-line progress bar on stderr, shown once an operation has taken a second.

    Call it as ``progress(label, done, total)``: the bar shows ``done / total`` (for a
    scenario run, the part of the whole run done) and the label what is running now.
    Shown only on a terminal unless ``enabled`` is given; redrawn at most ten times a
    second; ``close()`` clears it.
    """

    def __init__(self, stream=None, *, enabled=None, delay=1.0, interval=0.1, width=28):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = bool(enabled)
        self.delay = delay
        self.interval = interval
        self.width = width
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = 0

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        if now - self._last < self.interval and done < total:
            return
        self._last = now
        frac = min(1.0, done / total) if total else 1.0
        fill = int(frac * self.width)
        bar = "#" * fill + "-" * (self.width - fill)
        text = f"\r[{bar}] {frac * 100:5.1f}%  {now - self.start:6.1f}s  {label}"
        pad = max(0, self._shown - len(text))
        self.stream.write(text + " " * pad)
        self.stream.flush()
        self._shown = len(text)

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


# ============================================================================ options

def _param_type(param):
    def parse(text):
        # check now (argparse reports a bad value with exit status 2); the scenario
        # parses the text again, so the raw text is what is kept
        try:
            param.parse(text)
            return text
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = param.name
    return parse


def _counter_setting(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use COUNTER=NS, e.g. attr_writes_page=50")
    name, value = text.split("=", 1)
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number of nanoseconds") from None


def _key_value(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=VALUE")
    k, v = text.split("=", 1)
    return k.strip().replace("-", "_"), v.strip()


def _add_guest_options(p: argparse.ArgumentParser, *, with_scenario_params=True) -> None:
    from .scenarios import COMMON_PARAMS, SCENARIOS
    g = p.add_argument_group("guest and policies (default: the scenario's)")
    c = COMMON_PARAMS
    g.add_argument("--size", type=_param_type(c["size"]), metavar="SIZE", help=c["size"].help.replace("%", "%%"))
    g.add_argument("--platform", type=_param_type(c["platform"]), metavar="{snp,tdx,sw-protected}",
                   help=c["platform"].help)
    g.add_argument("--page-order", dest="page_order", type=_param_type(c["page_order"]),
                   metavar="{0,9,18,4K,2M,1G}", help=c["page_order"].help)
    g.add_argument("--direct-map", dest="direct_map", type=_param_type(c["direct_map"]),
                   metavar="{keep,no-direct-map,on-conversion}", help=c["direct_map"].help)
    g.add_argument("--tracking", type=_param_type(c["tracking"]), metavar="{in-place,legacy}",
                   help=c["tracking"].help)
    g.add_argument("--legacy", dest="tracking", action="store_const", const="legacy",
                   help="legacy attribute tracking (same as --tracking legacy)")
    g.add_argument("--flow", type=_param_type(c["flow"]), metavar="{in-place,legacy}", help=c["flow"].help)
    g.add_argument("--merge", type=_param_type(c["merge"]), metavar="{eager,never}", help=c["merge"].help)
    g.add_argument("--private-mapping", dest="private_mapping", type=_param_type(c["private_mapping"]),
                   metavar="{auto,4K,2M,1G}", help=c["private_mapping"].help)
    g.add_argument("--prefault", dest="prefault", action="store_const", const="true",
                   help=c["prefault"].help)
    g.add_argument("--seed", type=_param_type(c["seed"]), metavar="N", help=c["seed"].help)
    if with_scenario_params:
        s = p.add_argument_group("scenario parameters (each applies to the scenarios named)")
        seen: dict[str, tuple] = {}
        for scn in SCENARIOS.values():
            for name, prm in scn.params.items():
                if name in seen:
                    seen[name][1].append(scn.name)
                else:
                    seen[name] = (prm, [scn.name])
        for name, (prm, users) in seen.items():
            s.add_argument("--" + name.replace("_", "-"), dest="sp_" + name, type=_param_type(prm),
                           metavar="VALUE", help=f"{prm.help} [{', '.join(users)}]".replace("%", "%%"))
        s.add_argument("-p", "--param", action="append", type=_key_value, default=[], metavar="NAME=VALUE",
                       help="any scenario parameter by name (repeatable)")


def _add_cost_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cost")
    g.add_argument("--profile", metavar="NAME|FILE",
                   help="cost profile: snp, tdx, sw-protected or a TOML file (default: the platform's)")
    g.add_argument("--set", dest="cost_set", action="append", type=_counter_setting, default=[],
                   metavar="COUNTER=NS", help="override one figure, in ns per unit (repeatable)")


def _add_output_options(p: argparse.ArgumentParser, *, plot=True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print JSON for programs instead of tables")
    if plot:
        g.add_argument("--plot", metavar="FILE.png",
                       help="save a picture: cost breakdown and fragmentation over time (needs matplotlib)")
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="always show the progress bar (default: on a terminal, after a second)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="never show the progress bar")


def _raw_params(args) -> dict:
    """Parameters given on the command line (parsed values; None = not given)."""
    from .scenarios import COMMON_PARAMS
    out = {k: getattr(args, k) for k in COMMON_PARAMS if getattr(args, k, None) is not None}
    for k, v in vars(args).items():
        if k.startswith("sp_") and v is not None:
            out[k[3:]] = v
    for k, v in getattr(args, "param", []) or []:
        out[k] = v
    return out


def _check_params_for(target: str, params: dict) -> None:
    from .scenarios import SCENARIOS, COMMON_PARAMS, ScenarioError
    if target in SCENARIOS:
        known = SCENARIOS[target].all_params()
    else:
        known = COMMON_PARAMS
    bad = [k for k in params if k not in known]
    if bad:
        what = f"scenario {target!r}" if target in SCENARIOS else "a scenario file or trace"
        opts = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise ScenarioError(f"{opts}: not a parameter of {what} (its parameters: "
                            f"{', '.join(known)}; see 'gmemfast scenarios')")


def _cost_kwargs(args) -> dict:
    return {"profile": args.profile, "cost_overrides": dict(args.cost_set) or None}


def _plot_path(path, target: str, suffix: str = ""):
    """The file ``--plot`` writes (a directory gets a file named after the scenario)."""
    if path is None:
        return None
    from .plot import plot_path, require_matplotlib
    require_matplotlib()
    try:
        return plot_path(path, os.path.splitext(os.path.basename(target))[0] + suffix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_record_path(path):
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"--record {path} is a directory: give a file name ending in .csv or .jsonl")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--record {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--record {path}: folder {folder} is not writable")


class _Outputs:
    """Files a command writes: each written to a temporary file next to it, and all
    renamed into place together at the end, so a failure leaves none behind."""

    def __init__(self):
        self._done: list[tuple[str, str]] = []

    def write(self, path: str, writer):
        folder, name = os.path.split(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # as open() would create it, not mkstemp's 0600
        self._done.append((tmp, path))
        return writer(tmp)

    def commit(self) -> None:
        for tmp, path in self._done:
            os.replace(tmp, path)
        self._done = []

    def discard(self) -> None:
        for tmp, _path in self._done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._done = []


def _failed_line(results, labels=None) -> str | None:
    """One line for stderr when operations failed unexpectedly in any result, else None."""
    bad = []
    for i, r in enumerate(results):
        if not r.errors_as_expected:
            prefix = f"[{labels[i]}] " if labels else ""
            bad.append(prefix + errors_text(r.summary))
    if not bad:
        return None
    return ("gmemfast: operations failed: " + "; ".join(bad)
            + " (the first failure of each kind is in the report; exit status 1)")


# ============================================================================ commands

def _configure_run(p):
    p.add_argument("scenario", metavar="SCENARIO",
                   help="a built-in scenario (gmemfast scenarios), a .toml scenario file, or a "
                        ".csv/.jsonl trace")
    _add_guest_options(p)
    _add_cost_options(p)
    _add_output_options(p)
    g = p.add_argument_group("recording")
    g.add_argument("--record", metavar="FILE", help="also write the operations applied to guest memory "
                                                    "as a trace (.csv or .jsonl)")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first failed operation (beyond those a scenario file expects)")


def _cmd_run(args) -> int:
    from .scenarios import load_target, run_any, target_params
    from .trace import write_trace
    params = _raw_params(args)
    _check_params_for(args.scenario, params)
    plot = _plot_path(args.plot, args.scenario)
    _check_record_path(args.record)
    target = load_target(args.scenario)
    target_params(target, params)            # bad input is refused before anything runs
    progress = Progress(enabled=args.progress)
    try:
        res = run_any(target, params, progress=progress, record=bool(args.record),
                      strict=args.strict, **_cost_kwargs(args))
    finally:
        progress.close()
    out = _Outputs()
    try:
        n = out.write(args.record, lambda tmp: write_trace(tmp, res.ops)) if args.record else 0
        if plot:
            from .plot import plot_result
            out.write(plot, lambda tmp: plot_result(res, tmp))
        out.commit()
    finally:
        out.discard()
    if args.record:
        print(f"recorded {n:,} operations to {args.record}", file=sys.stderr)
    if args.json:
        print(json.dumps({"command": "run", **res.to_dict()}, indent=1))
    else:
        print(format_result(res))
        if plot:
            print(f"\nplot saved to {plot}")
    failed = _failed_line([res])
    if failed:
        sys.stdout.flush()
        print(failed, file=sys.stderr)
        return 1
    return 0


def _configure_compare(p):
    p.add_argument("scenario", metavar="SCENARIO", help="as for 'run'")
    p.add_argument("--vary", action="append", type=_key_value, default=[], metavar="NAME=A,B[,...]",
                   help="run once per value (several --vary: every combination); default: "
                        "--vary tracking=in-place,legacy")
    _add_guest_options(p)
    _add_cost_options(p)
    _add_output_options(p)


def _vary_axes(args) -> list:
    """The --vary axes as (name, [values]), every value checked by its parameter's parser."""
    from .scenarios import COMMON_PARAMS, SCENARIOS, ScenarioError
    known = SCENARIOS[args.scenario].all_params() if args.scenario in SCENARIOS else COMMON_PARAMS
    axes = []
    for key, values in args.vary or [("tracking", "in-place,legacy")]:
        _check_params_for(args.scenario, {key: None})
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if len(vals) < 1:
            raise ScenarioError(f"--vary {key}=: give values separated by commas")
        for v in vals:
            try:
                known[key].parse(v)
            except (ValueError, TypeError) as exc:
                raise ScenarioError(f"--vary {key}={values}: the value {v!r} is not valid: {exc}") from None
        axes.append((key, vals))
    return axes


def _cmd_compare(args) -> int:
    from .scenarios import ScenarioError, load_target, run_any, target_params
    params = _raw_params(args)
    axes = _vary_axes(args)
    combos = list(itertools.product(*[vals for _k, vals in axes]))
    if len(combos) < 2:
        raise ScenarioError("compare needs at least two configurations: give --vary NAME=A,B")
    if len(combos) > 16:
        raise ScenarioError(f"--vary makes {len(combos)} configurations; at most 16")
    plot = _plot_path(args.plot, args.scenario, "-compare")
    target = load_target(args.scenario)
    configs = []
    for combo in combos:
        p = dict(params)
        p.update({key: v for (key, _vals), v in zip(axes, combo)})
        lab = " ".join(f"{key}={v}" for (key, _vals), v in zip(axes, combo))
        try:
            target_params(target, p)         # every configuration checked before any runs
        except ScenarioError as exc:
            raise ScenarioError(f"configuration {lab}: {exc}") from None
        configs.append((lab, p))
    results, labels = [], [lab for lab, _p in configs]
    progress = Progress(enabled=args.progress)
    try:
        for k, (lab, p) in enumerate(configs):
            def prog(what, done, total, lab=lab, k=k):     # over all configurations
                progress(f"[{k + 1}/{len(configs)} {lab}] {what}", k * total + done, len(configs) * total)
            results.append(run_any(target, p, progress=prog, **_cost_kwargs(args)))
    finally:
        progress.close()
    if plot:
        from .plot import plot_compare
        out = _Outputs()
        try:
            out.write(plot, lambda tmp: plot_compare(results, labels, tmp))
            out.commit()
        finally:
            out.discard()
    if args.json:
        print(json.dumps({"command": "compare", "scenario": results[0].name,
                          "configurations": [{"label": l, **r.to_dict()} for l, r in zip(labels, results)]},
                         indent=1))
    else:
        print(format_compare(results, labels))
        if plot:
            print(f"\nplot saved to {plot}")
    failed = _failed_line(results, labels)
    if failed:
        sys.stdout.flush()
        print(failed, file=sys.stderr)
        return 1
    return 0


def _configure_launch(p):
    p.add_argument("platform", choices=("snp", "tdx"), help="the confidential VM type")
    p.add_argument("--ovmf", metavar="FILE", default=None,
                   help="OVMF / TDVF image (default: the first one found in $GMEMFAST_OVMF or "
                        "/usr/share/ovmf...; 'synthetic': a small generated image)")
    p.add_argument("--flow", choices=("in-place", "legacy"), default="in-place", help="populate flow")
    from .platforms.vmsa import CPU_SIGNATURES, VMM_TYPES
    p.add_argument("--vcpus", type=_vcpus, default=1, help="vCPUs (SNP: one VMSA each; 1 to 4096)")
    p.add_argument("--vcpu-type", default="EPYC-v4", choices=list(CPU_SIGNATURES), metavar="TYPE",
                   help="SNP vCPU type, as sev-snp-measure (default: EPYC-v4; one of "
                        + ", ".join(CPU_SIGNATURES) + ")")
    p.add_argument("--vmm-type", default="QEMU", type=_vmm_type, metavar="VMM",
                   help="SNP VMM type, as sev-snp-measure: " + ", ".join(VMM_TYPES) + " (default: QEMU)")
    p.add_argument("--concurrent", type=_positive_int, default=1, metavar="N",
                   help="N VMMs launch the same guest at once on one host (they share its PSP "
                        "on SNP); the wall time is until the last is launched")
    _add_cost_options(p)
    _add_output_options(p, plot=False)


def _positive_int(text):
    from .scenarios.params import parse_count
    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vcpus(text):
    from .scenarios.params import parse_vcpus
    try:
        return parse_vcpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vmm_type(text):
    from .platforms.vmsa import VMM_TYPES
    for name in VMM_TYPES:
        if text.upper() == name.upper():
            return name
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(VMM_TYPES)}")


def _cmd_launch(args) -> int:
    from .cost import CostModel
    from .firmware import find_ovmf_images, synthetic_ovmf
    from .launch import snp_measure_ovmf, tdx_measure_ovmf
    ovmf = args.ovmf
    if ovmf is None:
        found = find_ovmf_images()
        if not found:
            raise UsageError("no OVMF image found: pass --ovmf FILE (or --ovmf synthetic), or set "
                             "GMEMFAST_OVMF")
        ovmf = str(found[0])
    if ovmf == "synthetic":
        source, ovmf_name = synthetic_ovmf(), "synthetic"
    else:
        if not os.path.exists(ovmf):
            raise UsageError(f"--ovmf {ovmf}: no such file")
        if not os.path.isfile(ovmf):
            what = "a directory" if os.path.isdir(ovmf) else "not a regular file"
            raise UsageError(f"--ovmf {ovmf} is {what}: give an OVMF image file (or 'synthetic')")
        source, ovmf_name = ovmf, ovmf
    try:
        cost = CostModel.from_profile(args.profile or args.platform, **dict(args.cost_set))
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"--profile {args.profile}: no such built-in profile or file") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cost profile: {exc}") from None
    t0 = time.perf_counter()
    try:
        if args.platform == "snp":
            res = snp_measure_ovmf(source, vcpus=args.vcpus, vcpu_type=args.vcpu_type,
                                   vmm_type=args.vmm_type, flow=args.flow)
            kind = "SNP launch digest"
        else:
            res = tdx_measure_ovmf(source, flow=args.flow)
            kind = "TDX MRTD"
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{ovmf_name}: {exc}") from None
    from .wallclock import phase_time
    wall = time.perf_counter() - t0
    counts = {k: int(v) for k, v in res.counters.items() if v}
    est = cost.estimate(counts)
    snp = args.platform == "snp"
    n = args.concurrent
    one = phase_time(cost, counts, 1, name="launch")
    many = phase_time(cost, {k: v * n for k, v in counts.items()}, n, vms=n, name="launch")
    if args.json:
        print(json.dumps({"command": "launch", "platform": args.platform, "ovmf": ovmf_name,
                          "flow": args.flow, "vcpus": args.vcpus,
                          "vcpu_type": args.vcpu_type if snp else None,
                          "vmm_type": args.vmm_type if snp else None, "measurement_kind": kind,
                          "measurement": res.digest.hex(), "pages": res.pages,
                          "wall_ns": one.wall_ns, "cpu_ns": est.total_ns,
                          "total_ns": est.total_ns, "counters": counts, "estimate": est.to_dict(),
                          "concurrent": {"launches": n, **many.to_dict()},
                          "wall_seconds": wall}, indent=1))
        return 0
    print(f"{kind}: {res.digest.hex()}")
    print(f"firmware: {ovmf_name}   flow: {args.flow}   pages measured: {res.pages:,}")
    if snp:      # what the digest depends on besides the image (as sev-snp-measure takes them)
        print(f"vCPUs: {args.vcpus}   vCPU type: {args.vcpu_type}   VMM type: {args.vmm_type}")
    print(f"estimated launch: wall {format_ns(one.wall_ns)} (the VMM's one thread), cpu "
          f"{format_ns(est.total_ns)} (all work, firmware included)   (model run time {wall:.2f} s)")
    if n > 1:
        print(f"{n} concurrent launches on one host: wall {format_ns(many.wall_ns)} until the last is "
              f"launched, limited by {many.limit}; cpu {format_ns(many.cpu_ns)}")
    print()
    print(est.table())
    return 0


def _configure_scenarios(p):
    p.add_argument("--json", action="store_true", help="print JSON")


def _cmd_scenarios(args) -> int:
    from .scenarios import COMMON_PARAMS, SCENARIOS
    if args.json:
        out = []
        for s in SCENARIOS.values():
            ps = s.all_params()
            out.append({"name": s.name, "description": s.description, "doc": s.doc,
                        "params": {k: {"default": ps[k].show(ps[k].default), "help": ps[k].help,
                                       "common": k in COMMON_PARAMS} for k in ps}})
        print(json.dumps({"command": "scenarios", "scenarios": out}, indent=1))
        return 0
    print(format_scenarios(list(SCENARIOS.values()), COMMON_PARAMS))
    return 0


def _configure_sweep(p):
    from .sweep import add_arguments
    _add_guest_options(p)
    _add_cost_options(p)
    add_arguments(p)


def _cmd_sweep(args) -> int:
    from .sweep import cli_run
    params = _raw_params(args)
    _check_params_for(args.scenario, params)
    return cli_run(args, params, progress=Progress(enabled=args.progress), **_cost_kwargs(args))


def _configure_counters(p):
    p.add_argument("--profile", metavar="NAME|FILE",
                   help="also each counter's figure (ns per unit) and its source in this cost profile: "
                        "snp, tdx, sw-protected or a TOML file")
    p.add_argument("--json", action="store_true", help="print JSON")


def _cmd_counters(args) -> int:
    from ._layout import COUNTER_NAMES
    from .cost import BYTE_COUNTERS, COUNTER_UNITS, CostModel
    model = None
    if args.profile is not None:
        try:
            model = CostModel.from_profile(args.profile)
        except (FileNotFoundError, IsADirectoryError):
            raise UsageError(f"--profile {args.profile}: no such built-in profile or file") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--profile {args.profile}: {exc}") from None
    sources = model.sources() if model else {}
    rows = [{"name": n, "unit": COUNTER_UNITS.get(n, "count"), "byte_counter": n in BYTE_COUNTERS,
             **({"ns": model.ns_per_unit.get(n), "source": sources.get(n)} if model else {})}
            for n in COUNTER_NAMES]
    if args.json:
        print(json.dumps({"command": "counters", "profile": model.name if model else None,
                          "description": model.description if model else None, "counters": rows},
                         indent=1))
    else:
        print(format_counters(rows, model.name if model else None, model.description if model else ""))
    return 0


# ============================================================================ the table

@dataclass
class Command:
    """One subcommand. ``configure(parser)`` adds its arguments; ``run(args) -> int`` runs
    it. Either may be a ``"module:function"`` string, imported when needed."""
    name: str
    help: str
    configure: Callable | str
    run: Callable | str
    description: str = ""


def _resolve(fn):
    if isinstance(fn, str):
        mod, _, name = fn.partition(":")
        return getattr(importlib.import_module(mod), name)
    return fn


COMMANDS: list[Command] = [
    Command("run", "run a scenario, a scenario file or a trace", _configure_run, _cmd_run,
            "Run a workload and print counts, estimated time by operation, huge pages left and "
            "direct-map fragmentation."),
    Command("compare", "run one scenario under several policies side by side", _configure_compare,
            _cmd_compare,
            "Run a scenario once per configuration (--vary NAME=A,B) and print the results in "
            "columns, e.g. --vary direct_map=keep,on-conversion."),
    Command("launch", "launch measurement of an OVMF image and its cost", _configure_launch, _cmd_launch,
            "Load a firmware image through the populate path of an SNP or TDX VM and print the "
            "launch measurement (SNP launch digest or TDX MRTD) and its estimated cost."),
    Command("scenarios", "list the built-in scenarios and their parameters", _configure_scenarios,
            _cmd_scenarios),
    Command("counters", "list the work counters: unit, and a profile's figure and source",
            _configure_counters, _cmd_counters,
            "List every counter the model keeps and what one count of it is; with --profile, "
            "each one's figure in ns per unit and the source of that figure."),
    Command("import", "read a recording of a real guest's conversions into a trace",
            "gmemfast.importers:configure_cli", "gmemfast.importers:cli_run",
            "Read trace-cmd report text of KVM's tracepoints, the output of "
            "examples/gmemfast-conversions.bt, or QEMU's trace log of kvm_convert_memory, and "
            "write the conversions as a trace that 'gmemfast run' replays under any policy "
            "(examples/README.md has the recording commands)."),
    Command("bench", "the engine's speed and memory targets, against the baselines",
            "gmemfast.bench.cli:configure_cli", "gmemfast.bench.cli:cli_run",
            "Time the engine and its baselines (a pyroaring model, a dense numpy model) side by "
            "side in one run and print medians, ratios and whether each target is met. Needs "
            "the bench extra: pip install 'gmemfast[bench]'."),
    Command("sweep", "run a scenario over a grid of parameters, on Dask", _configure_sweep, _cmd_sweep,
            "Run a scenario once per combination of --grid values on a local Dask cluster (or "
            "--scheduler ADDRESS), writing one row per configuration to --out as rows complete. "
            "Needs the sweep extra: pip install 'gmemfast[sweep]'."),
]


def register_command(name: str, help: str, configure, run, description: str = "") -> Command:
    """Add (or replace) a subcommand; ``configure``/``run`` as in :class:`Command`."""
    cmd = Command(name, help, configure, run, description)
    for i, c in enumerate(COMMANDS):
        if c.name == name:
            COMMANDS[i] = cmd
            return cmd
    COMMANDS.append(cmd)
    return cmd


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line (argparse prints the usage too), exit 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__
    parser = _Parser(prog="gmemfast", description="A fast model of KVM guest_memfd for confidential "
                                                  "VMs (SEV-SNP, TDX): scenarios, costs, launches.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="exit status:\n" + "\n".join(f"  {k:<4} {v}" for k, v in EXIT_STATUSES.items()))
    parser.add_argument("--version", action="version", version=f"gmemfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        _resolve(cmd.configure)(p)
        p.set_defaults(run_command=cmd.run)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``gmemfast`` command; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(_resolve(args.run_command)(args) or 0)
    except KeyboardInterrupt:
        print("\ngmemfast: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:          # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BrokenPipeError:            # the reader went away (| head): stop quietly
        try:                               # and keep Python from flushing into the pipe at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    except Exception as exc:
        from .errors import GmemError
        from .scenarios import OperationFailed, ScenarioError
        from .trace import TraceError
        if isinstance(exc, OperationFailed):
            print(f"gmemfast: operation failed: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (UsageError, ScenarioError, TraceError, FileNotFoundError, IsADirectoryError)):
            print(f"gmemfast: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ValueError) and not isinstance(exc, GmemError):
            print(f"gmemfast: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, (GmemError, OSError)):
            print(f"gmemfast: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, ImportError) and "matplotlib" in str(exc):
            print(f"gmemfast: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":     # pragma: no cover
    sys.exit(main())
