"""Scenarios: checked against the naive reference model, plus results, parameters and
scenario files.

Each scenario runs at a small size with ``record=True``; the operations it applied to
guest memory are replayed on ``tests/naive.py``'s GuestMemfd and the two final states
are compared page by page (shareability, allocation, folio orders, direct map, ...).
"""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest

import naive
from gmemfast.errors import errno_name
from conftest import DUMP_KEYS, SMALL, dump_diff, normalize_dump
from gmemfast import GmemError, scenarios as S
from gmemfast import trace as T
from gmemfast.firmware import synthetic_ovmf
from gmemfast.launch import snp_measure_ovmf, tdx_measure_ovmf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMPARE_KEYS = tuple(k for k in DUMP_KEYS if k != "contents")   # contents: compared apart


# ------------------------------------------------------------------ the naive replay

def naive_twin(run_result_gmem):
    g = run_result_gmem
    return naive.GuestMemfd(g.size, g.flags, page_order=g.page_order, vm_type=g.vm_type,
                            direct_map=g.policies["direct_map"], merge=g.policies["merge"])


def legacy_pieces(ref, off, size):
    """Page ranges of [off, off+size) in each memslot of the scenarios' layout (the first
    2 GiB at GPA 0, the rest at 4 GiB, when the guest is larger than 0xB0000000 bytes)."""
    low = ref.size if ref.size <= 0xB0000000 else 2 << 30
    first, end = off // naive.PAGE_SIZE, (off + size) // naive.PAGE_SIZE
    cut = low // naive.PAGE_SIZE
    return [(a, b) for a, b in ((first, min(end, cut)), (max(first, cut), end)) if a < b]


class GuestExit(Exception):
    """The reference's stand-in for the engine's memory-fault exit in a replay."""


def replay_on_naive(ops: T.TraceOps, ref, tracking: str, launch_writes=None) -> dict:
    """Apply recorded ops to the reference; return its error counts by name (the errno's,
    or the exit's). ``launch_writes`` collects the pages written while launching (their
    bytes are the firmware's, which the trace does not record)."""
    errors = {}
    pins = {}
    legacy_private = [True] * ref.nr_pages     # the legacy VMM marks all memory private first
    phase = None

    def fail(exc):
        name = "MemoryFaultExit" if isinstance(exc, GuestExit) else errno_name(exc.errno)
        errors[name] = errors.get(name, 0) + 1

    for i in range(len(ops)):
        k = int(ops.kind[i])
        off, size, a, b = (int(ops.offset[i]), int(ops.size[i]), int(ops.a[i]), int(ops.b[i]))
        if size == T.ALL:
            size = ref.size - off
        try:
            if k == T.CONVERT:
                if tracking == "in-place":
                    ref.set_memory_attributes(off, size, a, b)
                else:
                    # legacy: the VM's per-GFN attributes change memslot by memslot (each
                    # piece that changes invalidates the guest's mappings), and the VMM
                    # discards the range on to-shared
                    for lo, hi in legacy_pieces(ref, off, size):
                        want = bool(a)
                        if any(legacy_private[p] != want for p in range(lo, hi)):
                            legacy_private[lo:hi] = [want] * (hi - lo)
                            ref._zap_guest(lo, hi)
                    if a == 0:
                        ref.fallocate(naive.FALLOC_FL_KEEP_SIZE | naive.FALLOC_FL_PUNCH_HOLE, off, size)
            elif k == T.PHASE:
                phase = ops.names[a]
            elif k == T.ALLOCATE:
                ref.fallocate(naive.FALLOC_FL_KEEP_SIZE, off, size)
                if phase == "launch" and launch_writes is not None:
                    # populate loads the page (legacy flow: copies it in)
                    launch_writes.update(range(off // naive.PAGE_SIZE, (off + size) // naive.PAGE_SIZE))
                if phase == "launch" and ref.vm_type != "sw-protected":
                    # a launch records each populated page as an allocation: populate
                    # hands it to the trusted entity (TDX maps it in the secure EPT)
                    for p in range(off // naive.PAGE_SIZE, (off + size) // naive.PAGE_SIZE):
                        ref.te[p] = naive.TE_ACCEPTED[ref.vm_type]
                        ref.guest_mapped[p] = ref.vm_type == "tdx"
            elif k == T.ACCEPT:                   # the guest accepts: faulted in and mapped
                first, end = off // naive.PAGE_SIZE, (off + size) // naive.PAGE_SIZE
                view = legacy_private if tracking != "in-place" else ref.private
                if not all(view[first:end]):
                    raise GuestExit()            # a shared page: a memory-fault exit
                ref.accept(first, end, a // naive.PAGE_SIZE)
            elif k == T.PUNCH:
                ref.fallocate(naive.FALLOC_FL_KEEP_SIZE | naive.FALLOC_FL_PUNCH_HOLE, off, size)
            elif k == T.WRITE:
                ref.host_write(off, bytes([a]) * size)
                if phase == "launch" and launch_writes is not None:
                    launch_writes.update(range(off // naive.PAGE_SIZE,
                                               (off + size - 1) // naive.PAGE_SIZE + 1))
            elif k == T.READ:
                ref.host_read(off, size)
            elif k == T.PIN:
                pins.setdefault(ops.names[a], []).append(ref.pin(off, size))
            elif k == T.UNPIN:
                held = pins.get(ops.names[a])
                if not held:
                    raise GmemError(errno.EINVAL, "no such pin")
                held.pop().release()
        except (GmemError, GuestExit) as exc:
            fail(exc)
    return errors


def assert_matches_naive(res, run_gmem, *, tracking="in-place", errors_too=True):
    ref = naive_twin(run_gmem)
    launch_writes = set()
    ref_errors = replay_on_naive(res.ops, ref, tracking, launch_writes)
    e = normalize_dump(run_gmem.dump())
    r = normalize_dump(ref.dump())
    for dump in (e, r):                       # firmware bytes: loaded, but not in the trace
        dump["contents"] = {p: c for p, c in dump["contents"].items() if p not in launch_writes}
    problems = dump_diff(e, r, COMPARE_KEYS + ("contents",))
    assert not problems, "scenario state differs from the reference:\n  " + "\n  ".join(problems)
    s = res.summary
    assert s["allocated_pages"] == sum(r["allocated"])
    if tracking == "in-place":
        assert s["private_pages"] == sum(r["private"])
    orders = {o: r["folio_order"].count(o) for o in (0, 9, 18)}
    assert s["huge_pages_left"] == (orders.get(run_gmem.page_order, 0) >> run_gmem.page_order
                                    if run_gmem.page_order else 0)
    assert s["direct_map"] == r["direct_map_entries"]
    if errors_too:
        assert s["errors"] == ref_errors


class Capture:
    """Keep the Runner a scenario ran on (to reach its guest_memfd afterwards)."""

    def __init__(self, monkeypatch):
        self.runs = []
        orig = S.Runner.__init__
        capture = self

        def init(self, *a, **k):
            orig(self, *a, **k)
            capture.runs.append(self)
        monkeypatch.setattr(S.Runner, "__init__", init)

    @property
    def gmem(self):
        return self.runs[-1].gmem


@pytest.fixture
def capture(monkeypatch):
    return Capture(monkeypatch)


# ------------------------------------------------------------------ scenarios vs naive

@pytest.mark.parametrize("platform,flow,order", [
    ("snp", "in-place", 9), ("snp", "legacy", 0), ("tdx", "in-place", 0), ("tdx", "legacy", 9),
    ("sw-protected", "in-place", 9),
])
def test_boot_matches_naive(capture, platform, flow, order):
    res = S.run_scenario("boot", {"size": "64M", "platform": platform, "flow": flow, "page_order": order,
                                  "kernel": "4M", "direct_map": "on-conversion"}, record=True)
    assert_matches_naive(res, capture.gmem)
    assert res.summary["errors"] == {}
    order = ("launch", "firmware", "accept-boot", "accept", "swiotlb")
    assert list(res.phases) == [p for p in order if p in res.phases]
    assert {"launch", "firmware", "swiotlb"} <= set(res.phases)
    nbytes = res.extra["swiotlb_bytes"]
    assert res.summary["shared_pages"] == nbytes // 4096
    assert res.summary["allocated_pages"] == res.summary["guest_pages"]


def test_boot_legacy_tracking_matches_naive(capture):
    res = S.run_scenario("boot", {"size": "64M", "tracking": "legacy", "page_order": 9, "kernel": "4M"},
                         record=True)
    assert_matches_naive(res, capture.gmem, tracking="legacy")
    assert list(res.phases)[0] == "set-private"
    # the per-GFN store writes one entry per page of guest memory (and more)
    assert res.counters["attr_writes_page"] >= res.summary["guest_pages"]
    # the SWIOTLB pool was discarded from guest_memfd and is shared per GFN
    assert res.summary["shared_pages"] == res.extra["swiotlb_bytes"] // 4096
    assert res.summary["allocated_pages"] == res.summary["guest_pages"] - res.extra["swiotlb_bytes"] // 4096


@pytest.mark.parametrize("params", [
    {"page_order": 18, "direct_map": "on-conversion", "conversions": 300, "window": 100},
    {"page_order": 9, "direct_map": "no-direct-map", "conversions": 2000, "window": 500, "reaccept": True},
    {"page_order": 0, "direct_map": "keep", "conversions": 1000, "window": 1000, "merge": "never"},
    {"page_order": 9, "tracking": "legacy", "conversions": 300, "window": 50, "platform": "tdx"},
])
def test_fragmentation_matches_naive(capture, params):
    p = {"size": "2G", **params}
    tracking = p.get("tracking", "in-place")
    res = S.run_scenario("fragmentation", p, record=True)
    assert_matches_naive(res, capture.gmem, tracking=tracking)
    if tracking == "in-place":
        # the last `window` conversions are still shared (fewer when pages repeat)
        assert 0 < res.summary["shared_pages"] <= p["window"]


def test_fragmentation_breaks_huge_pages_and_direct_map():
    res = S.run_scenario("fragmentation", {"size": "8G", "conversions": 3000, "window": 1000})
    s = res.summary
    assert s["huge_pages_max"] == 8
    assert s["huge_pages_left"] < 8
    assert s["direct_map"]["4K"] > 0 and s["direct_map"]["1G"] < 8
    tl = res.timeline
    assert tl[0]["huge_pages"] <= 8
    # once fragmented, the direct map never gets its 1G entries back
    ones = [t["dmap_1g"] for t in tl if t["phase"] in ("to-shared", "to-private")]
    assert ones == sorted(ones, reverse=True)
    assert [t["step"] for t in tl] == sorted(t["step"] for t in tl)
    assert [t["est_ns"] for t in tl] == sorted(t["est_ns"] for t in tl)


@pytest.mark.parametrize("params", [
    {"page_order": 0, "conversions": 3000, "in_flight": 16},
    {"page_order": 9, "conversions": 1000, "in_flight": 1, "direct_map": "on-conversion", "platform": "tdx"},
    {"page_order": 9, "conversions": 400, "in_flight": 8, "tracking": "legacy"},
])
def test_swiotlb_churn_matches_naive(capture, params):
    res = S.run_scenario("swiotlb-churn", {"size": "256M", **params}, record=True)
    assert_matches_naive(res, capture.gmem, tracking=params.get("tracking", "in-place"))
    # each conversion is a guest request: one exit each, both ways
    n_back = params["conversions"] - params["in_flight"]
    assert res.counters["guest_exits"] >= params["conversions"] + n_back
    assert set(res.phases) >= {"accept", "to-shared", "to-private"}


@pytest.mark.parametrize("params", [
    {"page_order": 9, "balloon": "25%", "granule": "2M", "rounds": 2},
    {"page_order": 18, "balloon": "64M", "granule": "4M", "rounds": 1, "platform": "tdx",
     "direct_map": "no-direct-map", "accept_chunk": "4K"},
])
def test_balloon_matches_naive(capture, params):
    res = S.run_scenario("balloon", {"size": "2G", **params}, record=True)
    assert_matches_naive(res, capture.gmem)
    assert res.summary["allocated_pages"] == res.summary["guest_pages"]    # refilled
    assert res.counters["pages_freed"] > 0
    assert {"inflate", "deflate"} <= set(res.phases)


# ------------------------------------------------------------------ results

def test_result_to_dict_is_json_and_consistent():
    res = S.run_scenario("boot", {"size": "128M", "kernel": "1M"})
    d = res.to_dict()
    again = json.loads(json.dumps(d))
    assert again == d
    assert set(d) >= {"scenario", "params", "profile", "total_ns", "phases", "counters", "estimate",
                      "summary", "timeline", "extra", "wall_seconds"}
    assert d["params"]["size"] == 128 << 20
    assert math.isclose(d["total_ns"], sum(p["ns"] for p in d["phases"].values()), rel_tol=1e-9)
    for name, ph in d["phases"].items():
        for c, n in ph["counters"].items():
            assert n <= d["counters"][c]
    for sample in d["timeline"]:
        assert set(sample) >= {"step", "phase", "huge_pages", "dmap_1g", "dmap_2m", "dmap_4k",
                               "private_pages", "est_ns"}
    assert len(d["extra"]["measurement"]) == 96


def test_accept_chunk_4k_vs_2m():
    # 2 MiB backing: the host maps private memory at 2 MiB, so a 2 MiB validation works
    r2 = S.run_scenario("boot", {"size": "128M", "kernel": 0, "page_order": 9})
    r4 = S.run_scenario("boot", {"size": "128M", "kernel": 0, "page_order": 9, "accept_chunk": "4K"})
    assert r2.counters.get("snp_pvalidate_2m", 0) > 0 and r2.counters.get("snp_pvalidate_4k", 0) < 600
    assert r2.counters.get("accept_fallbacks", 0) == 0
    assert r4.counters["snp_pvalidate_4k"] > 512 * r2.counters["snp_pvalidate_2m"] // 2
    assert r4.estimate.by_operation["firmware"].total_ns > r2.estimate.by_operation["firmware"].total_ns
    # 4 KiB backing (upstream guest_memfd): each 2 MiB validation falls back to 4 KiB
    f = S.run_scenario("boot", {"size": "128M", "kernel": 0})
    assert f.counters.get("snp_pvalidate_2m", 0) == 0
    # one refused 2 MiB validation per chunk; launch pages (firmware metadata) were accepted
    assert f.counters["accept_fallbacks"] == -(-f.counters["snp_pvalidate_4k"] // 512) == 64


def test_legacy_tracking_costs_per_page_attribute_writes():
    a = S.run_scenario("boot", {"size": "1G", "kernel": 0})
    b = S.run_scenario("boot", {"size": "1G", "kernel": 0, "tracking": "legacy"})
    assert a.counters.get("attr_writes_page", 0) == 0
    assert b.counters["attr_writes_page"] >= (1 << 30) // 4096
    assert "set-private" in b.estimate.by_operation


@pytest.mark.parametrize("platform,measure", [("snp", snp_measure_ovmf), ("tdx", tdx_measure_ovmf)])
def test_boot_measurement_equals_launch_module(platform, measure):
    expect = measure(synthetic_ovmf()).digest.hex()
    for flow in ("in-place", "legacy"):
        res = S.run_scenario("boot", {"size": "64M", "platform": platform, "flow": flow, "kernel": 0})
        assert res.extra["measurement"] == expect
    # a kernel populated as launch pages is measured: the digest changes, the same in both flows
    k = [S.run_scenario("boot", {"size": "64M", "platform": platform, "flow": f, "kernel": "64K",
                                 "kernel_load": "measured"}).extra["measurement"]
         for f in ("in-place", "legacy")]
    assert k[0] == k[1] != expect
    # QEMU's way: SNP measures the kernel's hash in the kernel-hashes page; TDX measures
    # it at run time (RTMR), so MRTD is the firmware's alone
    h = [S.run_scenario("boot", {"size": "64M", "platform": platform, "flow": f, "kernel": "64K"})
         .extra["measurement"] for f in ("in-place", "legacy")]
    assert h[0] == h[1]
    if platform == "snp":
        assert h[0] not in (expect, k[0])
        kernel = np.random.default_rng(0).integers(0, 256, 64 << 10, np.uint8).tobytes()
        from gmemfast.firmware import OvmfImage, snp_launch_plan
        plan = snp_launch_plan(OvmfImage.from_bytes(synthetic_ovmf()), 1, kernel=kernel)
        assert h[0] == plan.digest().hex()
    else:
        assert h[0] == expect


def test_progress_callback_and_scale():
    calls = []
    n = 5_000 if SMALL else 200_000
    res = S.run_scenario("fragmentation", {"size": "64G", "conversions": n, "window": 1000},
                         progress=lambda label, done, total: calls.append((label, done, total)))
    assert calls and all(0 <= d <= t for _l, d, t in calls)
    assert calls[-1][1] == calls[-1][2]
    assert len(res.timeline) <= 3 * S.TIMELINE_POINTS
    assert res.summary["operations"] >= n


def test_cost_profile_and_overrides():
    a = S.run_scenario("boot", {"size": "64M", "kernel": 0})
    b = S.run_scenario("boot", {"size": "64M", "kernel": 0}, profile="tdx")
    c = S.run_scenario("boot", {"size": "64M", "kernel": 0}, cost_overrides={"snp_pvalidate_4k": 0.0})
    assert a.estimate.profile == "snp" and b.estimate.profile == "tdx"
    assert a.counters == c.counters
    assert c.total_ns < a.total_ns
    with pytest.raises(S.ScenarioError, match="cost profile"):
        S.run_scenario("boot", {"size": "64M"}, profile="no-such-profile")


# ------------------------------------------------------------------ parameters

def test_params_defaults_and_errors():
    scn = S.get_scenario("fragmentation")
    p = S.resolve_params(scn, {"size": "1T", "page_order": "2M"})
    assert p["size"] == 1 << 40 and p["page_order"] == 9 and p["direct_map"] == "on-conversion"
    assert p["flow"] == "in-place"
    assert S.resolve_params(scn, {"tracking": "legacy"})["flow"] == "legacy"
    with pytest.raises(S.ScenarioError, match="no parameter"):
        S.resolve_params(scn, {"kernel": "1M"})
    with pytest.raises(S.ScenarioError, match="page_order"):
        S.resolve_params(scn, {"page_order": 7})
    with pytest.raises(S.ScenarioError, match="flow 'in-place' needs tracking"):
        S.resolve_params(scn, {"tracking": "legacy", "flow": "in-place"})
    with pytest.raises(S.ScenarioError, match="multiple of the backing page size"):
        S.resolve_params(scn, {"size": "3M", "page_order": 9})
    with pytest.raises(S.ScenarioError, match="platform"):
        S.resolve_params(scn, {"platform": "sev"})
    with pytest.raises(S.ScenarioError, match="unknown scenario"):
        S.get_scenario("bot")
    assert set(S.SCENARIOS) >= {"boot", "swiotlb-churn", "fragmentation", "balloon"}


def test_boot_too_small():
    with pytest.raises(S.ScenarioError, match="16M"):
        S.run_scenario("boot", {"size": "8M", "kernel": 0})


# ------------------------------------------------------------------ scenario files

def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_scenario_file_runs_and_matches_naive(tmp_path, capture):
    f = write(tmp_path, "w.toml", """
[scenario]
name = "mine"
[guest]
size = "1G"
page_order = 9
direct_map = "on-conversion"
platform = "tdx"
[[steps]]
op = "accept"
[[steps]]
op = "convert"
phase = "dma"
offset = "2M"
size = "8K"
attrs = "shared"
[[steps]]
op = "pin"
phase = "dma"
offset = "2M"
id = "p"
[[steps]]
op = "convert"
phase = "dma"
offset = "2M"
size = "8K"
attrs = "private"
[[steps]]
op = "unpin"
phase = "dma"
id = "p"
[[steps]]
op = "convert"
phase = "dma"
offset = "2M"
size = "8K"
attrs = "private"
[[steps]]
op = "convert"
offset = "900M"
size = "4K"
attrs = "shared"
flags = "zero"
[[steps]]
op = "random"
offset = "64M"
size = "64M"
count = 500
window = 20
seed = 3
[[steps]]
op = "churn"
offset = "256M"
size = "1M"
iterations = 2
[[steps]]
op = "punch"
offset = "512M"
size = "6M"
[[steps]]
op = "balloon"
size = "10%"
[[steps]]
op = "write"
offset = "900M"
size = "4K"
repeat = 2
""")
    res = S.run_scenario_file(f, record=True)
    assert res.name == "mine"
    assert res.summary["errors"] == {"EAGAIN": 1}
    assert {"accept", "dma", "convert", "to-shared", "to-private", "punch", "inflate", "deflate"} <= set(res.phases)
    assert_matches_naive(res, capture.gmem)


def test_scenario_file_overrides_and_cost(tmp_path):
    f = write(tmp_path, "c.toml", """
[guest]
size = "1G"
[cost]
profile = "tdx"
set = { bytes_zeroed_4k = 0.0 }
[[steps]]
op = "accept"
""")
    res = S.run_scenario_file(f, {"platform": "tdx", "size": "512M"})
    assert res.params["size"] == 512 << 20 and res.estimate.profile == "tdx"
    assert res.estimate.by_counter.get("bytes_zeroed_4k", 0.0) == 0.0


@pytest.mark.parametrize("text,match", [
    ("[[steps]]\nop = 'fly'\n", "step 1: unknown op 'fly'"),
    ("[[steps]]\nop = 'convert'\noffset = 0\nsize = '4K'\n", r"step 1 \(convert\): missing key\(s\) attrs"),
    ("[[steps]]\nop = 'accept'\nchunk = '2M'\ncolour = 1\n", r"unknown key\(s\) colour"),
    ("[guest]\nsize = 'big'\n[[steps]]\nop = 'accept'\n", r"\[guest\]: parameter size"),
    ("[guest]\nwidth = 1\n[[steps]]\nop = 'accept'\n", r"\[guest\]: unknown key\(s\) width"),
    ("[guest]\nsize = '1G'\n", "no steps"),
    ("[[steps]\nop = 1", "not valid TOML"),
    ("[extra]\n[[steps]]\nop = 'accept'\n", "unknown table"),
])
def test_scenario_file_errors(tmp_path, text, match):
    f = write(tmp_path, "bad.toml", text)
    with pytest.raises(S.ScenarioError, match=match) as ei:
        S.run_scenario_file(f)
    assert "bad.toml" in str(ei.value)


def test_scenario_file_runtime_error_names_step(tmp_path):
    f = write(tmp_path, "r.toml", "[guest]\nsize='1G'\n[[steps]]\nop='accept'\n[[steps]]\nop='convert'\n"
                                  "offset='1M'\nsize='4K'\nattrs='maybe'\n")
    with pytest.raises(S.ScenarioError, match=r"step 2 \(convert\): attrs"):
        S.run_scenario_file(f)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_scenario_files(name):
    sf = S.load_scenario_file(EXAMPLES / name)
    assert sf.steps
    if SMALL:                  # plain-Python kernels: fewer random conversions
        for step in sf.steps:
            if "count" in step:
                step["count"] = min(int(step["count"]), 2000)
    size = "4G" if name != "balloon-cycles.toml" else "8G"
    res = S.run_scenario_file(sf, {"size": size})
    assert res.total_ns > 0


def test_run_any_dispatch(tmp_path):
    assert S.run_any("boot", {"size": "64M", "kernel": 0}).name == "boot"
    with pytest.raises(S.ScenarioError, match="does not exist"):
        S.run_any(str(tmp_path / "none.toml"))
    with pytest.raises(S.ScenarioError, match="does not exist"):
        S.run_any(str(tmp_path / "none.jsonl"))
    with pytest.raises(S.ScenarioError, match="unknown scenario"):
        S.run_any("nothing")


def test_strict_stops_at_first_failure(tmp_path):
    f = write(tmp_path, "s.toml", "[guest]\nsize='1G'\n[[steps]]\nop='accept'\n[[steps]]\nop='convert'\n"
                                  "offset='1M'\nsize='4K'\nattrs='shared'\n[[steps]]\nop='pin'\noffset='1M'\n"
                                  "[[steps]]\nop='convert'\noffset='1M'\nsize='4K'\nattrs='private'\n")
    res = S.run_scenario_file(f)
    assert res.summary["errors"] == {"EAGAIN": 1} and not res.errors_as_expected
    assert res.summary["failures"][0]["where"].endswith("s.toml: step 4 (convert)")
    with pytest.raises(S.OperationFailed, match=r"s.toml: step 4 \(convert\): convert \[0x100000, \+0x1000\) "
                                                r"failed: EAGAIN"):
        S.run_scenario_file(f, strict=True)
    # declared as expected: the run is as expected, and strict lets exactly that one pass
    f.write_text(f.read_text() + "[expect]\nerrors = {EAGAIN = 1}\n")
    res = S.run_scenario_file(f, strict=True)
    assert res.summary["errors"] == {"EAGAIN": 1} and res.errors_as_expected


def test_swiotlb_default_size():
    assert S.swiotlb_default(4 << 40) == 1 << 30
    assert S.swiotlb_default(8 << 30) == (8 << 30) * 6 // 100 // (2 << 20) * (2 << 20)
    assert S.swiotlb_default(1 << 30) == 64 << 20
    assert S.swiotlb_default(64 << 20) == 16 << 20
    np.testing.assert_equal(S.swiotlb_default(8 << 20) % 4096, 0)
