"""Traces: the CSV and JSON-lines formats, their errors, and replay (batched) against
the naive reference model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_scenarios import COMPARE_KEYS, Capture, naive_twin, replay_on_naive
from conftest import dump_diff, normalize_dump
from gmemfast import scenarios as S
from gmemfast import trace as T

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def records(ops):
    return list(ops.records())


def test_examples_csv_and_jsonl_agree():
    a = T.read_trace(EXAMPLES / "bounce-trace.csv")
    b = T.read_trace(EXAMPLES / "bounce-trace.jsonl")
    assert records(a) == records(b)
    assert a.guest == {"size": "1G", "platform": "snp", "page_order": "9", "direct_map": "on-conversion"}
    assert b.guest["page_order"] == 9
    assert records(a)[0] == {"op": "phase", "name": "boot"}
    assert records(a)[2] == {"op": "phase", "name": "dma"}
    assert {"op": "convert", "offset": 0x200000, "size": 4096, "attrs": "private"} in records(a)
    # line numbers point at the source lines (comments and header count)
    assert int(a.line[0]) == 4 and int(b.line[0]) == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_write_read_round_trip(tmp_path, suffix):
    ops = T.OpList()
    ops.add(T.PHASE, a=ops.name("p1"))
    ops.add_many(T.CONVERT, np.arange(0, 40960, 4096), 4096, 0, 0)
    ops.add(T.CONVERT, 0, 8192, 8, 2)
    ops.add(T.CONVERT, 0, 8192, 8, 1)
    ops.add(T.ALLOCATE, 4096, T.ALL)
    ops.add(T.PUNCH, 8192, 4096)
    ops.add(T.WRITE, 0, 4096, 7)
    ops.add(T.WRITE, 0, 4096, T.DEFAULT_FILL)
    ops.add(T.READ, 0, 8192)
    ops.add(T.PIN, 0, 4096, ops.name("x"))
    ops.add(T.UNPIN, a=ops.name("x"), b=1)
    ops.add(T.ACCEPT, 0, 1 << 21, 1 << 21)
    ops.add(T.ACCEPT, 0, 4096, 4096)
    built = ops.build()
    path = tmp_path / ("t" + suffix)
    n = T.write_trace(path, built, {"size": "1G", "platform": "tdx"})
    assert n == len(built)
    back = T.read_trace(path)
    assert records(back) == records(built)
    assert back.guest["platform"] == "tdx" and back.guest["size"] == "1G"


def test_values():
    assert T.parse_number("0x1000", "o") == 4096
    assert T.parse_number("2M", "o") == 2 << 20
    assert T.parse_number(12288, "o") == 12288
    assert T.parse_number("all", "s", allow_all=True) == T.ALL
    with pytest.raises(ValueError, match="cannot read"):
        T.parse_number("2Q", "offset")
    assert T.parse_attrs("private") == 8 and T.parse_attrs("shared") == 0 and T.parse_attrs("8") == 8
    with pytest.raises(ValueError, match="attrs"):
        T.parse_attrs(4)
    assert T.parse_flags("zero") == 2 and T.parse_flags("preserve") == 1 and T.parse_flags(None) == 0
    assert T.parse_flags(3) == 3          # passed on: the model answers EINVAL
    with pytest.raises(ValueError, match="flags"):
        T.parse_flags("keep")


@pytest.mark.parametrize("text,line,match", [
    ('{"op": "convert", "offset": 0, "size": 4096}', 1, r"needs field\(s\) attrs"),
    ('\n\n{"op": "fly"}', 3, "unknown op 'fly'"),
    ('{"op": "punch", "offset": "2Q", "size": 4096}', 1, "offset: cannot read '2Q'"),
    ('{"op": "punch", "offset": 0, "size": 4096, "attrs": 8}', 1, r"does not take field\(s\) attrs"),
    ('{"op": "convert", "offset": 0, "size": 4096, "attrs": "maybe"}', 1, "attrs"),
    ('{"op": "convert", "offset": 0, "size": 4096, "attrs": 0}\n{"op": "write", "offset": 0, "size": 1, "fill": 300}',
     2, "fill"),
    ('{"op": "accept", "offset": 0, "size": 4096, "chunk": "1G"}', 1, "chunk"),
    ('{"op": "convert", "offset": 0\n', 1, "not valid JSON"),
    ('[1, 2]', 1, "must be an object"),
    ('{"op": "punch", "offset": 0, "size": 4096}\n{"op": "guest", "size": "1G"}', 2, "must come first"),
    ('{"op": "guest", "colour": "red"}', 1, "unknown key"),
    ('{"op": "punch", "offset": -4096, "size": 4096}', 1, "negative"),
    ('{"offset": 0}', 1, "no 'op'"),
])
def test_jsonl_errors_name_the_line(tmp_path, text, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(T.TraceError, match=match) as ei:
        T.read_trace(path)
    assert ei.value.line == line
    assert str(ei.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("text,line,match", [
    ("offset,size\n0,4096\n", 1, "header"),
    ("op,offset,size,colour\n", 1, "unknown column"),
    ("# only a comment\n", None, "no header"),
    ("op,offset,size\npunch,0,4096,9\n", 2, "cells but the header"),
    ("op,offset,size,attrs\n\n# c\nconvert,0,4096,\n", 4, r"needs field\(s\) attrs"),
    ("# gmemfast: size\nop,offset\n", 1, "key=value"),
])
def test_csv_errors_name_the_line(tmp_path, text, line, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(T.TraceError, match=match) as ei:
        T.read_trace(path)
    assert ei.value.line == line


def random_trace(rng, nr_pages, n):
    """A random trace: mostly conversions (in runs, for batching), some punches,
    allocations, writes, pins and accepts."""
    ops = T.OpList("<random>")
    pins = []
    for _ in range(n):
        r = rng.random()
        p = int(rng.integers(0, nr_pages))
        npg = int(rng.integers(1, min(1100, nr_pages - p) + 1))
        if r < 0.6:
            k = int(rng.integers(1, 40))
            offs = rng.integers(0, nr_pages - 4, k) * 4096
            sizes = rng.choice([4096, 8192, 16384], k)
            ops.add_many(T.CONVERT, offs, sizes, rng.choice([0, 8], k), rng.choice([0, 0, 2], k))
        elif r < 0.7:
            ops.add(T.PUNCH, p * 4096, npg * 4096)
        elif r < 0.8:
            ops.add(T.ALLOCATE, p * 4096, npg * 4096)
        elif r < 0.86:
            ops.add(T.WRITE, p * 4096, 4096, int(rng.integers(0, 256)))
        elif r < 0.92:
            name = f"pin{len(pins)}"
            ops.add(T.PIN, p * 4096, 4096, ops.name(name))
            pins.append(name)
        elif r < 0.96 and pins:
            ops.add(T.UNPIN, a=ops.name(pins.pop(0)), b=1)
        else:
            ops.add(T.PHASE, a=ops.name(f"phase{int(rng.integers(0, 3))}"))
    return ops.build()


@pytest.mark.parametrize("seed,order,dmap", [(1, 9, "on-conversion"), (2, 0, "no-direct-map"),
                                             (3, 9, "keep"), (4, 18, "on-conversion")])
def test_replay_matches_naive(monkeypatch, seed, order, dmap):
    rng = np.random.default_rng(seed)
    size = 1 << 30
    ops = random_trace(rng, size >> 12, 120)
    cap = Capture(monkeypatch)
    res = S.run_trace(ops, {"size": size, "page_order": order, "direct_map": dmap, "platform": "sw-protected"})
    g = cap.gmem
    ref = naive_twin(g)
    ref_errors = replay_on_naive(ops, ref, "in-place")
    problems = dump_diff(normalize_dump(g.dump()), normalize_dump(ref.dump()), COMPARE_KEYS + ("contents",))
    assert not problems, "\n".join(problems)
    assert res.summary["errors"] == ref_errors


def test_consecutive_conversions_are_batched(monkeypatch):
    calls = []
    from gmemfast.gmem import GuestMemfd
    orig = GuestMemfd.set_memory_attributes_many

    def spy(self, offs, *a, **k):
        calls.append(len(offs))
        return orig(self, offs, *a, **k)
    monkeypatch.setattr(GuestMemfd, "set_memory_attributes_many", spy)
    ops = T.OpList()
    ops.add_many(T.CONVERT, np.arange(100) * 4096, 4096, 0, 0)
    ops.add(T.PHASE, a=ops.name("x"))
    ops.add_many(T.CONVERT, np.arange(50) * 4096, 4096, 8, 0)
    S.run_trace(ops.build(), {"size": "64M", "platform": "sw-protected"})
    assert calls == [100, 50]


def test_replay_example_and_strict(tmp_path):
    res = S.run_trace(EXAMPLES / "bounce-trace.jsonl")
    assert res.params["size"] == 1 << 30 and res.params["page_order"] == 9
    assert res.summary["errors"] == {"EAGAIN": 1}
    assert set(res.phases) == {"boot", "dma"}
    # options override the trace's guest
    res2 = S.run_trace(EXAMPLES / "bounce-trace.csv", {"platform": "tdx"})
    assert res2.params["platform"] == "tdx" and res2.estimate.profile == "tdx"
    assert res.summary["expected_errors"] == {"EAGAIN": 1} and res.errors_as_expected
    (first,) = res.summary["failures"]
    assert first["where"].endswith("bounce-trace.jsonl:8") and first["errno"] == "EAGAIN"
    assert first["op"] == "convert" and first["offset"] == first["error_offset"] == 0x200000
    # strict: the expected failure passes, an unexpected one stops the replay at its line
    assert S.run_trace(EXAMPLES / "bounce-trace.csv", strict=True).summary["errors"] == {"EAGAIN": 1}
    ops = T.read_trace(EXAMPLES / "bounce-trace.csv")
    ops.expect = None
    with pytest.raises(S.OperationFailed, match=r"bounce-trace.csv:10: convert \[0x200000, \+0x1000\) .*EAGAIN"):
        S.run_trace(ops, strict=True)


def test_legacy_replay_of_same_trace():
    res = S.run_trace(EXAMPLES / "bounce-trace.jsonl", {"tracking": "legacy"})
    # legacy: no host mapping of CoCo guest_memfd (ENODEV for write/read/pin), conversions
    # go through the per-GFN store
    assert res.counters["vm_attr_calls"] > 0
    assert res.summary["errors"].get("ENODEV", 0) >= 2


def test_record_and_replay_reproduce_a_scenario(tmp_path):
    res = S.run_scenario("swiotlb-churn", {"size": "256M", "conversions": 500, "in_flight": 10,
                                           "page_order": 9, "direct_map": "on-conversion"}, record=True)
    path = tmp_path / "churn.jsonl"
    T.write_trace(path, res.ops)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["op"] == "guest" and first["size"] == "256M"
    again = S.run_trace(path)
    for key in ("private_pages", "allocated_pages", "huge_pages_left", "direct_map", "attribute_ranges"):
        assert again.summary[key] == res.summary[key], key
    # the replay does the same work (minus the guest exits the scenario added)
    for name, count in res.counters.items():
        if name != "guest_exits":
            assert again.counters.get(name, 0) == count, name


@pytest.mark.parametrize("recorded", ["in-place", "legacy"])
def test_replay_under_legacy_tracking_starts_from_private_memory(tmp_path, recorded):
    params = {"size": "256M", "conversions": 300, "in_flight": 10, "tracking": recorded}
    res = S.run_scenario("swiotlb-churn", params, record=True)
    assert res.summary["errors"] == {}
    path = tmp_path / "churn.jsonl"
    T.write_trace(path, res.ops)
    again = S.run_trace(path, {"tracking": "legacy"})
    assert again.summary["errors"] == {} and again.errors_as_expected
    assert "set-private" in again.phases and again.counters["vm_attr_calls"] > 0
    if recorded == "legacy":      # the same workload on the same kind of VM: the same end state
        for key in ("private_pages", "allocated_pages", "attribute_ranges", "direct_map"):
            assert again.summary[key] == res.summary[key], key


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_expected_errors_round_trip_through_a_recorded_trace(tmp_path, suffix):
    f = tmp_path / "s.toml"
    f.write_text("[guest]\nsize = '64M'\n[expect]\nerrors = {EAGAIN = 1}\n[[steps]]\nop = 'accept'\n"
                 "[[steps]]\nop = 'convert'\noffset = '1M'\nsize = '4K'\nattrs = 'shared'\n"
                 "[[steps]]\nop = 'pin'\noffset = '1M'\n"
                 "[[steps]]\nop = 'convert'\noffset = '1M'\nsize = '4K'\nattrs = 'private'\n")
    res = S.run_scenario_file(f, record=True)
    assert res.errors_as_expected and res.summary["errors"] == {"EAGAIN": 1}
    path = tmp_path / ("ops" + suffix)
    T.write_trace(path, res.ops)
    ops = T.read_trace(path)
    assert ops.expect == {"EAGAIN": 1} and "expect_errors" not in ops.guest
    again = S.run_trace(ops)
    assert again.summary["expected_errors"] == {"EAGAIN": 1} and again.errors_as_expected
    assert T.parse_error_counts("EAGAIN:1, EOPNOTSUPP=2") == {"EAGAIN": 1, "EOPNOTSUPP": 2}
    assert T.parse_error_counts("none") == {} and T.parse_error_counts({"EINVAL": 0}) == {}
