"""``gmemfast bench``: kept apart from the runner so that ``gmemfast --help`` works
without the ``bench`` extra installed."""
from __future__ import annotations

import json
import sys


def configure_cli(parser) -> None:
    """Arguments of ``gmemfast bench``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false",
                      help="few repeats, small per-call samples (the default; seconds)")
    mode.add_argument("--full", dest="full", action="store_true",
                      help="more repeats and the full per-call sample (minutes, not seconds)")
    parser.set_defaults(full=False)
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--only", default="", help="comma-separated target numbers, e.g. 1,3")


def cli_run(args) -> int:
    """``gmemfast bench``: the targets, quick by default; exit 1 if any target misses."""
    try:
        only = {int(x) for x in args.only.split(",") if x.strip()} or None
    except ValueError:
        raise ValueError(f"--only {args.only!r}: give target numbers 1-6 separated by commas") from None
    if only and not only <= {1, 2, 3, 4, 5, 6}:
        raise ValueError(f"--only {args.only!r}: targets are numbered 1 to 6")
    try:
        from .targets import format_table, run
    except ImportError as exc:
        raise ValueError(f"gmemfast bench needs the bench extra ({exc}): "
                         "pip install 'gmemfast[bench]'") from None
    res = run(not args.full, only=only,
              progress=None if args.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0 if res["passed"] else 1
