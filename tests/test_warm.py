"""The kernels' first compile (``gmemfast._warm``): what it compiles is what the page
store calls, it is announced once before compiling, and it leaves a stamp."""
from __future__ import annotations

import ast
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

import gmemfast
from gmemfast import _kernels as K
from gmemfast import _warm
from gmemfast.scenarios import run_scenario

STORE = Path(gmemfast.__file__).parent / "_store.py"
JIT = _warm.jit_enabled()


def test_every_kernel_the_store_calls_has_a_signature():
    called = set()      # every kernel the store names (calls, or resolves to call later)
    for node in ast.walk(ast.parse(STORE.read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "K" and callable(getattr(K, node.attr))):
            called.add(node.attr)
    assert called, "found no kernel calls in _store.py"
    assert called == set(_warm.SIGNATURES), (called ^ set(_warm.SIGNATURES))
    grouped = [n for g in _warm.GROUPS for n in g]
    assert sorted(grouped) == sorted(_warm.SIGNATURES), "each kernel in exactly one group"


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: nothing is compiled")
def test_runs_compile_nothing_beyond_the_warmed_signatures():
    """After a boot, a fragmentation run, a balloon, the batched forms, a check and a save,
    every kernel the store calls holds only the signature the first compile made: a run
    never compiles inside the time it reports."""
    for name, params in (("boot", {"size": "4G"}), ("fragmentation", {"size": "2G", "conversions": 300}),
                         ("balloon", {"size": "1G"}), ("swiotlb-churn", {"size": "1G", "conversions": 300})):
        run_scenario(name, params)
    vm = gmemfast.VM("tdx")
    g = vm.create_guest_memfd(8 << 20, gmemfast.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region(0, 0, 8 << 20, g)
    vm.guest_accept_many(np.arange(0, 8 << 20, 4096), 4096, chunk=4096)
    g.fallocate_many(3, [0], 4096)
    g.set_memory_attributes_many([0], 4096, 0)
    g.check()
    for name, sig in _warm.SIGNATURES.items():
        sigs = getattr(K, name).signatures
        assert all(tuple(s) == tuple(sig) for s in sigs), f"{name} compiled for {sigs}, warmed {sig}"


@pytest.mark.parametrize("kind", sorted(_warm.KINDS))
def test_first_compile_is_announced_once_and_stamped(tmp_path, monkeypatch, kind):
    stamp = tmp_path / "kernels.ok"
    compiled = []
    monkeypatch.setattr(_warm, "_DONE", set())
    monkeypatch.setattr(_warm, "jit_enabled", lambda: True)
    monkeypatch.setattr(_warm, "_stamp_path", lambda kind: str(stamp))
    monkeypatch.setattr(_warm, "compile_group", lambda names: compiled.append(tuple(names)))
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    said = []
    assert _warm.ensure_compiled(kind, said.append) is True
    assert len(said) == 1 and "compiling" in said[0]
    assert compiled == [tuple(g) for g in _warm.KINDS[kind]]
    assert stamp.exists()
    assert _warm.ensure_compiled(kind, said.append) is False       # this process: done
    monkeypatch.setattr(_warm, "_DONE", set())                      # a new process: the stamp
    assert _warm.ensure_compiled(kind, said.append) is False
    assert len(said) == 1 and len(compiled) == len(_warm.KINDS[kind])


def record_group(names):
    """A stand-in for ``compile_group`` (picklable, for the worker): marks who ran what."""
    d = Path(os.environ["GMEMFAST_TEST_WARM_DIR"])
    (d / f"{os.getpid()}-{names[0]}").write_text("")


def test_first_compile_shares_the_groups_with_a_worker(tmp_path, monkeypatch):
    """With two CPUs a run's first group is compiled here and the other in a worker."""
    monkeypatch.setattr(_warm, "_DONE", set())
    monkeypatch.setattr(_warm, "jit_enabled", lambda: True)
    monkeypatch.setattr(_warm, "_stamp_path", lambda kind: str(tmp_path / "kernels.ok"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("GMEMFAST_TEST_WARM_DIR", str(tmp_path))
    monkeypatch.setattr(_warm, "compile_group", record_group)
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here: a spawned worker would not see the recording stand-in")
    monkeypatch.setattr(_warm, "_context", lambda: multiprocessing.get_context("fork"))
    assert _warm.ensure_compiled("run", lambda text: None) is True
    by_pid = {}
    for pid, first in (m.name.split("-", 1) for m in tmp_path.iterdir() if "-" in m.name):
        by_pid.setdefault(pid, []).append(first)
    groups = _warm.RUN_GROUPS
    assert by_pid.get(str(os.getpid())) == [groups[0][0]], "only the first group compiles here"
    assert sorted(f for fs in by_pid.values() for f in fs) == sorted(g[0] for g in groups)
    assert len(by_pid) == 2, f"the groups ran in {len(by_pid)} process(es): {by_pid}"


def test_a_run_leaves_out_the_compile_of_kernels_it_first_needs_part_way(monkeypatch):
    """The batched one-page conversions compile when a run first needs them; the run's
    reported time leaves that out (here a stand-in compile that takes 0.5 s)."""
    import time
    calls = []

    def slow_compile(kind, announce):
        calls.append(kind)
        time.sleep(0.5)
        _warm._DONE.add(kind)
        return True
    monkeypatch.setattr(_warm, "_DONE", {"run", "state"})
    monkeypatch.setattr(_warm, "jit_enabled", lambda: True)
    monkeypatch.setattr(_warm, "_ensure_compiled", slow_compile)
    t0 = time.perf_counter()
    res = run_scenario("swiotlb-churn", {"size": "1G", "conversions": 20_000})
    elapsed = time.perf_counter() - t0
    assert calls == ["pages"], "the run converts a batch of single pages"
    assert res.wall_seconds <= elapsed - 0.5, (res.wall_seconds, elapsed)
    assert res.wall_seconds >= 0
    assert res.timeline[-1]["wall_s"] <= res.wall_seconds


def test_boot_needs_only_the_kernels_every_run_calls(monkeypatch):
    """The first boot after an install compiles the ``run`` kernels and nothing else."""
    kinds = []
    monkeypatch.setattr(_warm, "_DONE", set())
    monkeypatch.setattr(_warm, "jit_enabled", lambda: True)
    monkeypatch.setattr(_warm, "_ensure_compiled",
                        lambda kind, announce: kinds.append(kind) or _warm._DONE.add(kind) or True)
    run_scenario("boot", {"size": "4G"})
    assert sorted(set(kinds)) == ["run"]
