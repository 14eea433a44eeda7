"""Sweeps on dask.distributed: a 12-configuration grid of ``fragmentation`` at 64 GiB
(three direct-map policies x four seeds) on a local cluster of one and of two worker
processes, after warm-up.

Targets: two workers finish the grid at least 1.6x faster than one; the sweep
machinery (scheduling, moving rows, writing the output file) adds at most 100 ms per
configuration on top of the model's own run time on the workers.

- asv: ``SweepFragmentation64G`` times the whole sweep (``time_grid``) and tracks the
  grid's elapsed time after warm-up (``track_grid_seconds``) and the overhead per
  configuration (``track_overhead_ms``), for 1 and 2 workers. The cluster is started
  and warmed up in ``setup``.
- One-off figures with the ratio and both targets::

      python benchmarks/bench_sweep.py [--repeat 5] [--json]

Overhead per configuration = (grid seconds x workers - sum of the rows' run_seconds) /
configurations: all the time workers were not running the model, so with two workers
it also counts any wait for the last configuration.

On a shared machine the speedup is bounded by the cores other work leaves free: the
report also times a plain CPU loop in one and in two processes at the same moment (the
machine's ceiling) and shows the model's run time per configuration with one and two
workers (equal when each worker had a core to itself).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

GRID = {"direct_map": ["keep", "no-direct-map", "on-conversion"], "seed": [0, 1, 2, 3]}
FIXED = {"size": "64G"}
SPEEDUP_TARGET = 1.6
OVERHEAD_TARGET_MS = 100.0


def _modules():
    try:
        import distributed
        from gmemfast.sweep import run_sweep
    except ImportError as e:
        raise NotImplementedError(f"needs the sweep extra: {e}") from e
    return distributed, run_sweep


class LocalSweep:
    """A local cluster of ``workers`` processes, warmed up, and a scratch output file."""

    def __init__(self, workers: int):
        import logging
        distributed, self.run_sweep = _modules()
        self.workers = workers
        self.cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                dashboard_address=":0", silence_logs=logging.ERROR)
        self.client = distributed.Client(self.cluster)
        self.tmp = tempfile.TemporaryDirectory()
        self.n = 0
        self.run()                    # warm-up: kernels compiled, workers' caches hot

    def run(self):
        self.n += 1
        out = os.path.join(self.tmp.name, f"rows-{self.n}.parquet")
        frame = self.run_sweep("fragmentation", GRID, FIXED, client=self.client, out=out)
        assert len(frame) == 12 and frame["error"].isna().all()
        grid = frame.attrs["seconds"]["grid"]
        overhead = (grid * self.workers - float(frame["run_seconds"].sum())) / len(frame)
        return {"grid_seconds": grid, "overhead_ms": overhead * 1000,
                "model_seconds": float(frame["run_seconds"].sum())}

    def close(self):
        self.client.close()
        self.cluster.close()
        self.tmp.cleanup()


class SweepFragmentation64G:
    params = [[1, 2]]
    param_names = ["workers"]
    timeout = 600
    number = 1
    repeat = 3
    warmup_time = 0

    def setup(self, workers):
        self.sweep = LocalSweep(workers)

    def teardown(self, workers):
        self.sweep.close()

    def time_grid(self, workers):
        self.sweep.run()

    def track_grid_seconds(self, workers):
        return self.sweep.run()["grid_seconds"]
    track_grid_seconds.unit = "seconds"

    def track_overhead_ms(self, workers):
        return self.sweep.run()["overhead_ms"]
    track_overhead_ms.unit = "ms per configuration"


def _burn(n):
    import time
    t = time.perf_counter()
    s = 0
    for i in range(n):
        s += i
    return time.perf_counter() - t


def cpu_ceiling(n=10_000_000, tasks=4) -> float:
    """Speedup of a plain CPU loop in two processes over one, right now on this machine."""
    import time
    from concurrent.futures import ProcessPoolExecutor
    wall = {}
    for procs in (1, 2):
        with ProcessPoolExecutor(procs) as ex:
            list(ex.map(_burn, [1000] * procs))
            t = time.perf_counter()
            list(ex.map(_burn, [n] * tasks))
            wall[procs] = time.perf_counter() - t
    return wall[1] / wall[2]


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed sweeps per cluster size (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    ceiling = cpu_ceiling()
    res = {}
    for workers in (1, 2):
        s = LocalSweep(workers)
        try:
            runs = [s.run() for _ in range(args.repeat)]
        finally:
            s.close()
        res[workers] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        res[workers]["runs"] = runs
    speedup = res[1]["grid_seconds"] / res[2]["grid_seconds"]
    overhead = res[1]["overhead_ms"]
    out = {"configurations": 12, "repeat": args.repeat,
           "grid_seconds_1_worker": res[1]["grid_seconds"], "grid_seconds_2_workers": res[2]["grid_seconds"],
           "speedup": speedup, "speedup_target": SPEEDUP_TARGET,
           "overhead_ms_1_worker": overhead, "overhead_ms_2_workers": res[2]["overhead_ms"],
           "overhead_target_ms": OVERHEAD_TARGET_MS,
           "passed": speedup >= SPEEDUP_TARGET and overhead <= OVERHEAD_TARGET_MS,
           "cpu_loop_speedup_2_processes": ceiling,
           "model_seconds_per_configuration": {str(w): res[w]["model_seconds"] / 12 for w in res},
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cores": os.cpu_count(),
           "runs": {str(w): res[w]["runs"] for w in res}}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"12 configurations of fragmentation at 64G, medians of {args.repeat} sweeps after warm-up")
        print(f"  1 worker:  {res[1]['grid_seconds']:.2f} s   (model {res[1]['model_seconds']:.2f} s, "
              f"overhead {res[1]['overhead_ms']:.1f} ms per configuration)")
        print(f"  2 workers: {res[2]['grid_seconds']:.2f} s   (model {res[2]['model_seconds']:.2f} s, "
              f"overhead {res[2]['overhead_ms']:.1f} ms per configuration)")
        print(f"  speedup {speedup:.2f}x (target >= {SPEEDUP_TARGET}x); overhead {overhead:.1f} ms "
              f"(target <= {OVERHEAD_TARGET_MS:.0f} ms)")
        print(f"  load average before {load_before[0]:.2f}, after {out['loadavg_after'][0]:.2f} "
              f"on {os.cpu_count()} cores; a plain CPU loop runs {ceiling:.2f}x faster in 2 processes "
              f"than in 1 right now; model time per configuration {res[1]['model_seconds'] / 12:.2f} s "
              f"(1 worker), {res[2]['model_seconds'] / 12:.2f} s (2 workers)")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
