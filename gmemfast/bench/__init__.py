"""Speed and memory targets of the engine, measured against two baselines in one run.

``baselines`` holds what a careful user would write instead (a pyroaring model) and a
dense numpy model; ``targets.run(quick)`` times engine and baselines side by side and
reports medians and ratios (``gmemfast bench``); the asv suite in ``benchmarks/`` uses the
same workloads. Needs the ``bench`` extra (pyroaring, psutil).
"""
