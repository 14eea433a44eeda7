"""The ``gmemfast`` command.

::

    gmemfast run SCENARIO [options]        a built-in scenario, a .toml file or a trace
    gmemfast compare SCENARIO --vary KEY=A,B [options]   side by side under policies
    gmemfast launch snp|tdx [--ovmf FILE]  launch measurement and its cost
    gmemfast scenarios                     list the scenarios and their parameters

Errors print one line on stderr and exit with status 2; Ctrl-C exits with 130.

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
import time
from dataclasses import dataclass
from typing import Callable

from .report import format_compare, format_ns, format_result, format_scenarios

__all__ = ["COMMANDS", "Command", "Progress", "main", "register_command", "build_parser"]


class UsageError(Exception):
    """A bad option value found after parsing: printed, exit status 2."""


# ============================================================================ progress

class Progress:
    """A one-line progress bar on stderr, shown once an operation has taken a second.

    Call it as ``progress(label, done, total)``. Shown only on a terminal unless
    ``enabled`` is given; redrawn at most ten times a second; ``close()`` clears it.
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
        text = f"\r{label} [{bar}] {frac * 100:5.1f}% {done:,}/{total:,}  {now - self.start:6.1f}s"
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


def _check_plot_path(path):
    if path is None:
        return
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(f"--plot {path}: folder {d} does not exist")
    from .plot import require_matplotlib
    require_matplotlib()


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
    g.add_argument("--strict", action="store_true", help="stop at the first failed operation")


def _cmd_run(args) -> int:
    from .scenarios import run_any
    from .trace import write_trace
    params = _raw_params(args)
    _check_params_for(args.scenario, params)
    _check_plot_path(args.plot)
    progress = Progress(enabled=args.progress)
    try:
        res = run_any(args.scenario, params, progress=progress, record=bool(args.record),
                      strict=args.strict, **_cost_kwargs(args))
    finally:
        progress.close()
    if args.record:
        n = write_trace(args.record, res.ops)
        print(f"recorded {n:,} operations to {args.record}", file=sys.stderr)
    if args.plot:
        from .plot import plot_result
        plot_result(res, args.plot)
    if args.json:
        print(json.dumps({"command": "run", **res.to_dict()}, indent=1))
    else:
        print(format_result(res))
        if args.plot:
            print(f"\nplot saved to {args.plot}")
    return 0


def _configure_compare(p):
    p.add_argument("scenario", metavar="SCENARIO", help="as for 'run'")
    p.add_argument("--vary", action="append", type=_key_value, default=[], metavar="NAME=A,B[,...]",
                   help="run once per value (several --vary: every combination); default: "
                        "--vary tracking=in-place,legacy")
    _add_guest_options(p)
    _add_cost_options(p)
    _add_output_options(p)


def _cmd_compare(args) -> int:
    from .scenarios import ScenarioError, run_any
    params = _raw_params(args)
    vary = args.vary or [("tracking", "in-place,legacy")]
    axes = []
    for key, values in vary:
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if len(vals) < 1:
            raise ScenarioError(f"--vary {key}=: give values separated by commas")
        axes.append((key, vals))
    combos = list(itertools.product(*[vals for _k, vals in axes]))
    if len(combos) < 2:
        raise ScenarioError("compare needs at least two configurations: give --vary NAME=A,B")
    if len(combos) > 16:
        raise ScenarioError(f"--vary makes {len(combos)} configurations; at most 16")
    for key, _ in axes:
        _check_params_for(args.scenario, {key: None})
    _check_plot_path(args.plot)
    results, labels = [], []
    progress = Progress(enabled=args.progress)
    try:
        for combo in combos:
            p = dict(params)
            label = []
            for (key, _vals), v in zip(axes, combo):
                p[key] = v
                label.append(f"{key}={v}")
            lab = " ".join(label)
            labels.append(lab)

            def prog(what, done, total, lab=lab):
                progress(f"[{lab}] {what}", done, total)
            results.append(run_any(args.scenario, p, progress=prog, **_cost_kwargs(args)))
    finally:
        progress.close()
    if args.plot:
        from .plot import plot_compare
        plot_compare(results, labels, args.plot)
    if args.json:
        print(json.dumps({"command": "compare", "scenario": results[0].name,
                          "configurations": [{"label": l, **r.to_dict()} for l, r in zip(labels, results)]},
                         indent=1))
    else:
        print(format_compare(results, labels))
        if args.plot:
            print(f"\nplot saved to {args.plot}")
    return 0


def _configure_launch(p):
    p.add_argument("platform", choices=("snp", "tdx"), help="the confidential VM type")
    p.add_argument("--ovmf", metavar="FILE", default=None,
                   help="OVMF / TDVF image (default: the first one found in $GMEMFAST_OVMF or "
                        "/usr/share/ovmf...; 'synthetic': a small generated image)")
    p.add_argument("--flow", choices=("in-place", "legacy"), default="in-place", help="populate flow")
    p.add_argument("--vcpus", type=_positive_int, default=1, help="vCPUs (SNP: one VMSA each)")
    p.add_argument("--vcpu-type", default="EPYC-v4", help="SNP vCPU type (as sev-snp-measure)")
    p.add_argument("--vmm-type", default="QEMU", help="SNP VMM type: QEMU or ec2")
    p.add_argument("--concurrent", type=_positive_int, default=1, metavar="N",
                   help="N VMMs launch the same guest at once on one host (they share its PSP "
                        "on SNP); the wall time is until the last is launched")
    _add_cost_options(p)
    _add_output_options(p, plot=False)


def _positive_int(text):
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


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
        if not os.path.isfile(ovmf):
            raise UsageError(f"--ovmf {ovmf}: no such file")
        source, ovmf_name = ovmf, ovmf
    try:
        cost = CostModel.from_profile(args.profile or args.platform, **dict(args.cost_set))
    except FileNotFoundError:
        raise UsageError(f"--profile {args.profile}: no such built-in profile or file") from None
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
    n = args.concurrent
    one = phase_time(cost, counts, 1, name="launch")
    many = phase_time(cost, {k: v * n for k, v in counts.items()}, n, vms=n, name="launch")
    if args.json:
        print(json.dumps({"command": "launch", "platform": args.platform, "ovmf": ovmf_name,
                          "flow": args.flow, "vcpus": args.vcpus, "measurement_kind": kind,
                          "measurement": res.digest.hex(), "pages": res.pages,
                          "wall_ns": one.wall_ns, "cpu_ns": est.total_ns,
                          "total_ns": est.total_ns, "counters": counts, "estimate": est.to_dict(),
                          "concurrent": {"launches": n, **many.to_dict()},
                          "wall_seconds": wall}, indent=1))
        return 0
    print(f"{kind}: {res.digest.hex()}")
    print(f"firmware: {ovmf_name}   flow: {args.flow}   pages measured: {res.pages:,}"
          + (f"   vCPUs: {args.vcpus}" if args.platform == "snp" else ""))
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
    def error(self, message):          # argparse's own: usage + message, exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__
    parser = _Parser(prog="gmemfast", description="A fast model of KVM guest_memfd for confidential "
                                                  "VMs (SEV-SNP, TDX): scenarios, costs, launches.")
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
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:
        from .errors import GmemError
        from .scenarios import ScenarioError
        from .trace import TraceError
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
