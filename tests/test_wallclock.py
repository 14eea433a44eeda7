"""Wall-clock time (gmemfast.wallclock, docs/model.md §10): the formula's invariants on
arbitrary work, the scenarios' phases and threads, and the JSON and text output."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from gmemfast import scenarios as S
from gmemfast._layout import COUNTER_NAMES
from gmemfast.cost import BUILTIN_PROFILES, CostModel, Resource
from gmemfast.report import format_compare, format_result
from gmemfast.wallclock import THREADS, phase_time, wall_time

VCPUS = (1, 2, 4, 8, 16, 32, 64)
MODELS = {name: CostModel.from_profile(name) for name in BUILTIN_PROFILES}


def counts_strategy():
    return st.dictionaries(st.sampled_from(COUNTER_NAMES), st.integers(0, 10**12), max_size=20)


# -- the formula -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(BUILTIN_PROFILES), counts=counts_strategy(),
       threads=st.integers(1, 512), more=st.integers(0, 512), vms=st.integers(1, 16))
def test_wall_never_exceeds_cpu_and_never_grows_with_threads(name, counts, threads, more, vms):
    model = MODELS[name]
    a = phase_time(model, counts, threads, vms=vms)
    b = phase_time(model, counts, threads + more, vms=vms)
    assert a.cpu_ns == b.cpu_ns == pytest.approx(model.estimate(counts).total_ns if counts else 0.0,
                                                 rel=1e-12, abs=1e-6)
    assert a.wall_ns <= a.cpu_ns * (1 + 1e-12)
    assert b.wall_ns <= a.wall_ns * (1 + 1e-12)
    assert a.wall_ns == a.bounds[a.limit] == max(a.bounds.values())
    assert all(v <= a.cpu_ns * (1 + 1e-12) for v in a.bounds.values())


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(BUILTIN_PROFILES), counts=counts_strategy())
def test_one_thread_is_the_cpu_time(name, counts):
    t = phase_time(MODELS[name], counts, 1)
    assert t.wall_ns == t.cpu_ns and t.limit == THREADS


def test_bounds_by_hand():
    """A made-up profile whose every bound is worked out by hand."""
    ns = {"guest_exits": 1000.0, "snp_fw_launch_update": 5000.0, "bytes_zeroed_4k": 0.1,
          "tdx_seamcall_page_aug": 500.0}
    src = {k: "estimate: test" for k in ns}
    res = [Resource("psp", "serial", "host", "estimate: test", counters=("snp_fw_launch_update",)),
           Resource("fault", "serial", "vm", "estimate: test", holds={"tdx_seamcall_page_aug": 2000.0}),
           Resource("membw", "bandwidth", "host", "estimate: test", counters=("bytes_zeroed_4k",),
                    gb_per_s=40.0, bytes_each={"guest_exits": 4096.0}),
           Resource("read", "shared", "vm", "estimate: test", counters=("guest_exits",))]
    m = CostModel("hand", ns, src, resources=res)
    counts = {"guest_exits": 100, "snp_fw_launch_update": 10, "bytes_zeroed_4k": 4_000_000,
              "tdx_seamcall_page_aug": 100}
    cpu = 100 * 1000 + 10 * 5000 + 4_000_000 * 0.1 + 100 * 500      # 600 000 ns
    t = phase_time(m, counts, 8)
    assert t.cpu_ns == pytest.approx(cpu)
    assert t.bounds[THREADS] == pytest.approx(cpu / 8)                # 75 000
    assert t.bounds["psp"] == pytest.approx(50_000)
    # holds are the resource's own time per count, capped by the phase's CPU time
    assert t.bounds["fault"] == pytest.approx(200_000)
    # bandwidth: bytes / 40 GB/s, each counter capped at its own one-thread time
    assert t.bounds["membw"] == pytest.approx(4_000_000 / 40 + 100 * 4096 / 40)
    assert "read" not in t.bounds                                      # shared: no bound
    assert t.limit == "fault" and t.wall_ns == pytest.approx(200_000)
    # four VMs doing that work at once: the per-VM lock divides, the host's PSP does not
    t4 = phase_time(m, {k: 4 * v for k, v in counts.items()}, 4, vms=4)
    assert t4.bounds["fault"] == pytest.approx(200_000)
    assert t4.bounds["psp"] == pytest.approx(200_000)
    assert t4.bounds[THREADS] == pytest.approx(cpu)
    assert t4.wall_ns == pytest.approx(cpu) and t4.limit == THREADS


def test_wall_time_of_phases_adds_up():
    m = MODELS["tdx"]
    w = wall_time(m, {"a": {"guest_exits": 10}, "b": {"tdx_seamcall_page_aug": 10_000}}, {"b": 8})
    assert list(w.phases) == ["a", "b"] and w.phases["a"].threads == 1
    assert w.wall_ns == pytest.approx(w.phases["a"].wall_ns + w.phases["b"].wall_ns)
    assert w.phases["b"].limit == "td_private_fault"
    assert json.loads(json.dumps(w.to_dict())) == w.to_dict()
    assert "td_private_fault" in w.table() and "threads" in w.table()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_threads_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        phase_time(MODELS["snp"], {"guest_exits": 1}, bad)


# -- the scenarios -----------------------------------------------------------------------------

def boot(platform, vcpus, **kw):
    return S.run_scenario("boot", {"size": "8G", "platform": platform, "vcpus": vcpus, **kw})


@pytest.mark.parametrize("platform", ["snp", "tdx", "sw-protected"])
@pytest.mark.parametrize("accept", ["eager", "lazy"])
def test_boot_phases_never_slower_with_more_vcpus(platform, accept):
    runs = [boot(platform, v, accept=accept) for v in VCPUS]
    for r in runs:
        for name, ph in r.wall.phases.items():
            assert ph.wall_ns <= ph.cpu_ns * (1 + 1e-12), name
            if ph.threads == 1:
                assert ph.wall_ns == ph.cpu_ns, name
        assert r.wall_ns <= r.cpu_ns * (1 + 1e-12)        # (sums of floats in another order)
    for a, b in zip(runs, runs[1:]):
        for name in a.wall.phases:
            if name == "launch" and platform == "snp":
                # the one phase whose work grows with the vCPUs: a VMSA each, measured by
                # the PSP (one SNP_LAUNCH_UPDATE per vCPU)
                extra = b.counters["snp_fw_launch_update"] - a.counters["snp_fw_launch_update"]
                assert extra == b.vcpus - a.vcpus
                continue
            assert b.wall.phases[name].wall_ns <= a.wall.phases[name].wall_ns * (1 + 1e-12), name
    if platform != "snp":
        assert all(b.wall_ns <= a.wall_ns for a, b in zip(runs, runs[1:]))
        assert len({r.cpu_ns for r in runs}) == 1         # same work, only spread wider


def test_only_eager_acceptance_runs_on_the_vcpus():
    r = boot("tdx", 16)
    threads = {n: p.threads for n, p in r.wall.phases.items()}
    assert threads == {"launch": 1, "firmware": 1, "accept-boot": 1, "accept": 16, "swiotlb": 1}
    lazy = boot("tdx", 16, accept="lazy")
    assert "accept" not in lazy.wall.phases and lazy.wall_ns < r.wall_ns


@pytest.mark.parametrize("workers", ["vcpus", 1])
def test_accept_drain_never_slower_with_more_vcpus(workers):
    walls = []
    for v in VCPUS:
        r = S.run_scenario("accept-drain", {"size": "16G", "platform": "tdx", "vcpus": v,
                                            "workers": v if workers == "vcpus" else 1})
        d = r.wall.phases["drain"]
        assert d.threads == (v if workers == "vcpus" else 1)
        assert d.wall_ns <= d.cpu_ns
        walls.append(d.wall_ns)
    assert all(b <= a for a, b in zip(walls, walls[1:]))
    if workers == 1:
        assert len(set(walls)) == 1
    else:
        assert walls[-1] < walls[0] / 4


def test_accept_drain_touches_and_accepts_all_memory():
    r = S.run_scenario("accept-drain", {"size": "4G", "platform": "tdx", "accept_chunk": "4K"})
    s = r.summary
    assert s["allocated_pages"] == s["guest_pages"] == s["private_pages"]
    drained = r.extra["drained_bytes"]
    assert drained + r.extra["accepted_at_boot"] == 4 << 30
    d = r.phases["drain"]
    assert d["guest_pages_touched"] == drained // 4096 == d["tdx_accepts"]
    assert d["accept_memory_calls"] == drained // (4 << 20)


def test_lazy_boot_accepts_the_memmap_the_reserve_and_swiotlb():
    r = S.run_scenario("boot", {"size": "64G", "platform": "tdx", "accept": "lazy", "kernel": 0})
    memmap = 64 * (64 << 30) // 4096
    accepted = r.extra["accepted_at_boot"]
    assert accepted == r.summary["allocated_pages"] * 4096
    assert memmap + (512 << 20) + (1 << 30) < accepted < memmap + (512 << 20) + (1 << 30) + (1 << 30)
    eager = S.run_scenario("boot", {"size": "64G", "platform": "tdx", "kernel": 0})
    assert eager.summary["allocated_pages"] * 4096 == 64 << 30


def test_kernel_load_hashes_touches_the_kernel_in_the_guest_instead():
    h = S.run_scenario("boot", {"size": "1G", "platform": "snp", "kernel": "16M"})
    m = S.run_scenario("boot", {"size": "1G", "platform": "snp", "kernel": "16M", "kernel_load": "measured"})
    assert m.phases["launch"]["snp_fw_launch_update"] - h.phases["launch"]["snp_fw_launch_update"] == 4096
    assert h.phases["firmware"]["guest_pages_touched"] == 4096
    assert "guest_pages_touched" not in m.phases["firmware"]
    # the PSP's 1 ms per page makes the measured kernel the slow launch (SEVeriFast)
    assert m.wall.phases["launch"].wall_ns > 4e9 > 0.2e9 > h.wall.phases["launch"].wall_ns


# -- the host's private mapping level and prefaulting ------------------------------------------

def drain_counts(platform, **kw):
    r = S.run_scenario("accept-drain", {"size": "2G", "platform": platform, "page_order": 9, **kw})
    return r, r.phases["drain"], r.extra["drained_bytes"] // 4096


def test_tdx_mapping_levels_in_a_drain():
    r4, d4, pages = drain_counts("tdx")                                  # auto: 4 KiB on TDX
    assert d4["accept_fallbacks"] == pages // 512 and d4["guest_exits"] == pages
    r2, d2, _ = drain_counts("tdx", private_mapping="2M")                # huge pages: one each
    assert d2.get("accept_fallbacks", 0) == 0 and d2["tdx_seamcall_page_aug"] == pages // 512
    assert r2.wall.phases["drain"].wall_ns < r4.wall.phases["drain"].wall_ns
    # prefaulted at 2 MiB but accepted at 4 KiB: split per 2 MiB, retried once when the
    # other vCPUs are in the TD
    r, d, _ = drain_counts("tdx", private_mapping="2M", prefault=True, accept_chunk="4K")
    assert d["tdx_seamcall_demote"] == d["tdx_seamcall_block"] == pages // 512
    assert d.get("tdx_busy_retries", 0) == 0
    r, d, _ = drain_counts("tdx", private_mapping="2M", prefault=True, accept_chunk="4K", vcpus=4, workers=4)
    assert d["tdx_busy_retries"] == d["tdx_seamcall_demote"] == pages // 512
    assert r.wall.phases["drain"].wall_ns <= r.wall.phases["drain"].cpu_ns


def test_private_mapping_is_bounded_by_the_backing():
    a = S.run_scenario("accept-drain", {"size": "1G", "platform": "tdx", "private_mapping": "1G"})
    b = S.run_scenario("accept-drain", {"size": "1G", "platform": "tdx", "private_mapping": "4K"})
    assert a.counters == b.counters                                    # 4 KiB backing: 4 KiB maps
    with pytest.raises(S.ScenarioError, match="private_mapping"):
        S.run_scenario("boot", {"size": "1G", "private_mapping": "8K"})


# -- output ------------------------------------------------------------------------------------

def test_result_json_has_wall_and_cpu_time():
    r = boot("tdx", 4)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["cpu_ns"] == d["total_ns"] == r.estimate.total_ns
    assert d["wall_ns"] == pytest.approx(sum(p["wall_ns"] for p in d["phases"].values()))
    assert d["wall_ns"] < d["cpu_ns"] and d["vcpus"] == 4
    assert math.isclose(d["cpu_ns"], sum(p["cpu_ns"] for p in d["phases"].values()), rel_tol=1e-9)
    acc = d["phases"]["accept"]
    assert acc["threads"] == 4 and acc["limited_by"] == "td_private_fault"
    assert acc["wall_ns"] == max(acc["bounds"].values())
    assert all(s["wall_ns"] <= s["est_ns"] * (1 + 1e-9) for s in d["timeline"])
    assert d["timeline"][-1]["wall_ns"] == pytest.approx(d["wall_ns"])


def test_text_says_which_time_is_which():
    r = boot("tdx", 4)
    text = format_result(r)
    assert "estimated wall time" in text and "on 4 vCPUs" in text and "cpu time" in text
    assert "wall: elapsed time" in text and "limited by" in text and "td_private_fault" in text
    runs = [boot("tdx", v) for v in (1, 4, 16, 64)]
    cmp = format_compare(runs, [f"vcpus={v}" for v in (1, 4, 16, 64)])
    first = cmp.splitlines()[4]
    assert first.startswith("wall time (elapsed)")
    walls = first.split()[3:]
    assert len(walls) == 8                                 # four times, each "<number> <unit>"
    assert "cpu time (all work)" in cmp and "td_private_fault" in cmp
