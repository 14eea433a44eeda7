"""Whole scenarios, trace replay, an OVMF launch and the booted-guest round trip.

A slower scenario shows in ``asv compare`` even when no single operation's benchmark
moved. Every benchmark checks the result of the work it timed (a counter, the state, a
digest), in the timed call or, where a check would cost as much as the work, in
``teardown`` over every call made, so a model that skipped the work cannot look fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gmemfast.bench import workloads as W

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name, **params):
    from gmemfast.scenarios import run_scenario
    return run_scenario(name, params)


class Scenarios:
    """Built-in scenarios at sizes that take about a second each."""

    params = [["boot 4T", "boot 1T lazy 4K", "fragmentation 4T", "swiotlb-churn 64G", "balloon 64G"]]
    param_names = ["scenario"]
    timeout = 600
    number = 1
    repeat = (3, 7, 60.0)
    warmup_time = 0

    RUNS = {
        "boot 4T": ("boot", {"size": "4T"}),
        "boot 1T lazy 4K": ("boot", {"size": "1T", "accept": "lazy", "accept_chunk": "4K"}),
        "fragmentation 4T": ("fragmentation", {"size": "4T"}),
        "swiotlb-churn 64G": ("swiotlb-churn", {"size": "64G", "conversions": 50_000}),
        "balloon 64G": ("balloon", {"size": "64G"}),
    }

    def setup(self, scenario):
        W.warm_engine()
        self.name, self.params = self.RUNS[scenario]

    def time_scenario(self, scenario):
        res = _run(self.name, **self.params)
        s = res.summary
        assert not s["errors"], s["errors"]
        assert s["operations"] > 0 and res.counters, "the scenario did no work"
        if self.name == "boot":
            assert s["private_pages"] < s["guest_pages"], "SWIOTLB was not converted"
            assert res.counters.get("guest_exits", 0) > 0
        elif self.name == "fragmentation":
            assert res.counters["convert_calls"] >= 200_000 and res.counters["folio_merges_1g"] > 0
        elif self.name == "balloon":
            assert res.counters["punch_calls"] > 0 and res.counters["pages_freed"] > 0

    def track_model_seconds(self, scenario):
        return _run(self.name, **self.params).wall_seconds

    track_model_seconds.unit = "s"


class TraceReplay:
    """Replaying the example trace (examples/bounce-trace.csv) and a recorded fragmentation."""

    timeout = 600
    number = 1
    repeat = (3, 10, 60.0)
    warmup_time = 0

    def setup(self):
        W.warm_engine()
        from gmemfast.scenarios import run_scenario
        rec = run_scenario("fragmentation", {"size": "64G", "conversions": 20_000, "window": 5_000},
                           record=True)
        self.ops = rec.ops
        self.want = rec.summary["private_pages"]

    def time_replay_recorded_fragmentation(self):
        from gmemfast.scenarios import run_trace
        res = run_trace(self.ops, {"size": "64G", "page_order": 18, "direct_map": "on-conversion"})
        assert res.summary["private_pages"] == self.want, "the replay did not reach the recorded state"

    def time_replay_example_trace(self):
        from gmemfast.scenarios import run_any
        res = run_any(str(EXAMPLES / "bounce-trace.csv"))
        assert res.counters.get("convert_calls", 0) > 0


class OvmfLaunch:
    """An SNP and a TDX launch of the synthetic OVMF image through populate."""

    params = [["snp", "tdx"]]
    param_names = ["platform"]
    timeout = 300

    def setup(self, platform):
        W.warm_engine()
        from gmemfast import snp_measure_ovmf, tdx_measure_ovmf
        from gmemfast.firmware import synthetic_ovmf
        self.image = synthetic_ovmf()
        self.kw = {"vcpus": 2} if platform == "snp" else {}
        self.measure = snp_measure_ovmf if platform == "snp" else tdx_measure_ovmf
        self.want = self.measure(self.image, **self.kw).digest

    def time_launch(self, platform):
        r = self.measure(self.image, **self.kw)
        assert r.digest == self.want and len(r.digest) == 48


class BootedGuestRoundTrip:
    """A 4 KiB conversion to shared (splitting a 1 GiB folio) and back (merging it) in a
    booted 16 GiB guest, each platform and direct-map policy; and on a bare file."""

    params = [list(W.PLATFORMS) + ["bare file"], list(W.DIRECT_MAPS)]
    param_names = ["platform", "direct_map"]
    timeout = 600
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0
    ROUND_TRIPS = 500

    def setup(self, platform, direct_map):
        gm = W.warm_engine()
        if platform == "bare file" and direct_map != "keep":
            raise NotImplementedError("the bare file has no direct-map policy of its own")
        self.g = W.bare_file() if platform == "bare file" else W.booted_guest(platform, direct_map, churn=5_000)[1]
        self.P = gm.KVM_MEMORY_ATTRIBUTE_PRIVATE
        self.offs = W.roundtrip_pages(self.ROUND_TRIPS).tolist()
        self.calls = 0
        self.before = dict(self.g.counters)

    def time_500_round_trips(self, platform, direct_map):
        rt, g, P = W.split_merge_roundtrip, self.g, self.P
        for o in self.offs:
            rt(g, o, P)
        self.calls += len(self.offs)

    def teardown(self, platform, direct_map):
        if not hasattr(self, "g"):            # a skipped combination
            return
        c = self.g.counters
        for name in ("folio_splits_1g", "folio_merges_1g"):
            assert c[name] - self.before[name] == self.calls, f"{name}: not one per round trip"
        assert all(self.g.folio_order(o) == 18 for o in self.offs[:10])


class BatchedAccept:
    """Every 4 KiB page of an 8 GiB TDX guest accepted in random order, batched."""

    timeout = 600
    number = 1
    repeat = (3, 7, 60.0)
    warmup_time = 0

    def setup(self):
        W.warm_engine()
        self.pages = np.random.default_rng(W.SWIOTLB_SEED).permutation((8 * W.GIB) // W.PAGE).astype(np.int64)

    def time_accept_every_page(self):
        vm, _g = W.accept_guest(8 * W.GIB)
        assert W.accept_every_page(vm, self.pages) == 0
        assert vm.counters["tdx_accepts"] == self.pages.size
