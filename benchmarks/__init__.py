"""asv benchmarks for gmemfast, with the baselines they are compared against.

``baselines.py``      the pyroaring model and the dense numpy model
``bench_*.py``        the asv suite (time_* / track_* / peakmem_*), engine and baselines
                      side by side so one run gives the ratios
``run_targets.py``    the issue's targets in one process each, medians, ratios, pass/fail
"""
