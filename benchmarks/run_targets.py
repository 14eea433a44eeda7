"""Run the issue's speed and memory targets side by side (same as ``gmemfast bench``).

    python benchmarks/run_targets.py [--quick] [--json] [--only 1,3]
"""
import sys

from gmemfast.bench.targets import main

if __name__ == "__main__":
    sys.exit(main())
