"""Importing recordings of real guests (docs/model.md §12): the shipped examples, addresses,
each event form, bad input, and the ``gmemfast import`` command."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gmemfast import cli
from gmemfast import scenarios as S
from gmemfast.importers import (FORMATS, gpa_of, import_trace, low_memory, offset_of, parse_text,
                                render)
from gmemfast.trace import CONVERT, OpList, TraceError, read_trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
G = 1 << 30


def _maker():
    spec = importlib.util.spec_from_file_location("make_import_examples",
                                                  EXAMPLES / "make_import_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def maker():
    return _maker()


def triples(ops):
    keep = ops.kind == CONVERT
    return list(zip(ops.offset[keep].tolist(), ops.size[keep].tolist(), ops.a[keep].tolist()))


# -- the shipped examples ------------------------------------------------------------------

def test_examples_are_reproducible(maker, tmp_path):
    made = maker.write(tmp_path)
    for fmt, name in maker.FILES.items():
        assert made[fmt].read_text() == (EXAMPLES / name).read_text(), f"{name}: run {maker.__file__}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_examples_import_to_what_made_them(maker, fmt):
    want = triples(maker.conversions())
    res = import_trace(fmt, EXAMPLES / maker.FILES[fmt])
    assert triples(res.ops) == want
    assert res.guest["size"] == "4G" and res.size_inferred
    assert not res.skipped
    # the conversions above 4 GiB came back to offsets past the 2 GiB of low memory
    assert any(off >= 2 * G for off, _n, _a in want)


def test_example_recordings_agree_and_say_what_they_know(maker):
    res = {fmt: import_trace(fmt, EXAMPLES / maker.FILES[fmt]) for fmt in FORMATS}
    assert res["trace-cmd"].guest == {"size": "4G", "platform": "snp", "tracking": "legacy"}
    assert res["trace-cmd"].used == "kvm_vm_set_mem_attributes"
    assert res["trace-cmd"].events["kvm_userspace_exit"] == len(res["trace-cmd"].ops)
    assert res["bpftrace"].guest == {"size": "4G", "tracking": "legacy"}
    assert res["qemu"].guest == {"size": "4G"} and res["qemu"].used == "kvm_convert_memory"


@pytest.mark.parametrize("platform, tracking", [("snp", "legacy"), ("tdx", "in-place"),
                                                ("sw-protected", "in-place")])
def test_imported_trace_replays_under_any_policy(maker, tmp_path, platform, tracking):
    ops = import_trace("qemu", EXAMPLES / maker.FILES["qemu"]).ops
    r = S.run_trace(ops, {"platform": platform, "tracking": tracking})
    assert not r.summary["errors"]
    shared = sum(n for _o, n, a in triples(ops)) and r.summary["shared_pages"]
    assert r.summary["private_pages"] + shared == r.summary["guest_pages"]


# -- addresses -----------------------------------------------------------------------------

def test_q35_layout():
    assert low_memory(2 * G) == 2 * G and low_memory(0xB0000000) == 0xB0000000
    assert low_memory(3 * G) == 2 * G
    assert offset_of(0x1000) == 0x1000 and offset_of(4 * G) == 2 * G and offset_of(5 * G) == 3 * G
    assert gpa_of(2 * G, 8 * G) == 4 * G and gpa_of(2 * G - 4096, 8 * G) == 2 * G - 4096
    assert gpa_of(2 * G, 2.5 * G) == 2 * G                 # an all-low guest
    for off in (0, 4096, 2 * G - 4096, 2 * G, 7 * G):
        assert offset_of(gpa_of(off, 8 * G)) == off


def test_ranges_outside_ram_are_left_out():
    # GFNs: [1.5G, 4.5G) spans the end of low memory, the hole and the start of high memory
    text = "1 attrs 60000 120000 0\n2 attrs ffc00 fff00 8\n3 attrs 280000 280400 0\n"
    res = parse_text("bpftrace", text, size="8G")
    assert triples(res.ops) == [(int(1.5 * G), G // 2, 0), (2 * G, G // 2, 0)]
    assert res.skipped["below 4 GiB, not guest RAM (firmware, MMIO)"] == 2
    assert res.skipped["beyond the guest's memory"] == 1     # GPA 10 GiB: past 8 GiB of RAM


def test_size_is_inferred_from_the_highest_address():
    assert parse_text("bpftrace", "1 attrs 0 100 8\n").guest["size"] == "1G"
    assert parse_text("bpftrace", "1 attrs 80000 a0000 8\n").guest["size"] == "2560M"   # all low: 2 MiB steps
    assert parse_text("bpftrace", "1 attrs 100000 100001 8\n").guest["size"] == "3G"


# -- event forms ---------------------------------------------------------------------------

TC = " qemu-system-x86-1 [000] ..... 10.000001: {}"


def tc(*events):
    return "\n".join(["cpus=2", "version = 6"] + [TC.format(e) for e in events]) + "\n"


def test_trace_cmd_forms():
    text = tc("kvm_vm_set_mem_attributes: 0x00000000000010 -- 0x00000000000012 [0x8]",
              "kvm_vm_set_mem_attributes:  . 0x00000000000020 -- 0x00000000000021 [0x0]",   # split ioctl
              "kvm_vm_set_mem_attributes: gfn 0x30, cnt 0x2, attributes 0x8",
              "kvm_vm_set_mem_attributes: 0000000000000000 -- 0x00000000000001 [0x0]",      # GFN 0
              "kvm_page_fault: vcpu 0 rip 0xffff address 0x0000000000001000 error_code 0x4",
              "kvm_exit: vcpu 0 reason NPF rip 0x0 info1 0x0 info2 0x0 intr_info 0x0 error_code 0x0")
    res = parse_text("trace-cmd", text)
    assert triples(res.ops) == [(0x10000, 0x2000, 8), (0x20000, 0x1000, 0), (0x30000, 0x2000, 8),
                                (0, 0x1000, 0)]
    assert res.events["kvm_page_fault"] == 1 and res.events["kvm_exit"] == 1


def test_trace_cmd_hypercall_and_msr_psc_when_no_attribute_events():
    hc = tc("kvm_hypercall: nr 0xc a0 0x200000 a1 0x200 a2 0x10 a3 0x0",      # MapGPA: 2M encrypted
            "kvm_hypercall: nr 0xc a0 0x200000 a1 0x1 a2 0x0 a3 0x0",
            "kvm_hypercall: nr 0x5 a0 0x0 a1 0x0 a2 0x0 a3 0x0")              # not MAP_GPA_RANGE
    res = parse_text("trace-cmd", hc)
    assert res.used == "kvm_hypercall"
    assert triples(res.ops) == [(0x200000, 0x200000, 8), (0x200000, 0x1000, 0)]
    shared = (2 << 52) | (0x345 << 12) | 0x014
    private = (1 << 52) | (0x345 << 12) | 0x014
    msr = tc(f"kvm_vmgexit_msr_protocol_enter: vcpu 0, ghcb_gpa {shared:016x}",
             f"kvm_vmgexit_msr_protocol_enter: vcpu 0, ghcb_gpa {private:016x}",
             "kvm_vmgexit_msr_protocol_enter: vcpu 0, ghcb_gpa 0000000000012002")   # not a PSC
    res = parse_text("trace-cmd", msr)
    assert res.used == "kvm_vmgexit_msr_protocol_enter" and res.guest["platform"] == "snp"
    assert triples(res.ops) == [(0x345000, 0x1000, 0), (0x345000, 0x1000, 8)]
    # with attribute events in the file, the guest's requests are only counted
    both = tc("kvm_hypercall: nr 0xc a0 0x200000 a1 0x1 a2 0x0 a3 0x0",
              "kvm_vm_set_mem_attributes: 0x00000000000200 -- 0x00000000000201 [0x0]")
    res = parse_text("trace-cmd", both)
    assert res.used == "kvm_vm_set_mem_attributes" and len(res.ops) == 1


def test_qemu_forms():
    text = ("qemu-system-x86_64: warning: something unrelated\n"
            "kvm_convert_memory start 0x100000000 size 0x2000 private_to_shared\n"
            "1234@1713700000.123456:kvm_convert_memory start 0x1000 size 0x1000 shared_to_private\n"
            "kvm_memory_fault start 0x1000 size 0x1000 flags 0x8\n")
    res = parse_text("qemu", text, size="8G")
    assert triples(res.ops) == [(2 * G, 0x2000, 0), (0x1000, 0x1000, 8)]
    assert res.events["kvm_memory_fault"] == 1
    rba = ("ram_block_attributes_state_change offset 0x80000000 size 0x1000 from 'discarded' to 'populated'\n"
           "ram_block_attributes_state_change offset 0x2000 size 0x1000 from 'mixture' to 'discarded'\n")
    res = parse_text("qemu", rba, size="8G")      # RAM-block offsets are guest_memfd offsets
    assert res.used == "ram_block_attributes_state_change"
    assert triples(res.ops) == [(2 * G, 0x1000, 0), (0x2000, 0x1000, 8)]


def test_render_and_import_round_trip_on_random_conversions():
    rng = np.random.default_rng(5)
    size = 6 * G
    ops = OpList()
    offs = rng.integers(0, size // 4096 - 16, 200) * 4096
    ops.add_many(CONVERT, offs, rng.integers(1, 16, 200) * 4096, rng.choice([0, 8], 200), 0)
    ops = ops.build()
    for fmt in FORMATS:
        back = parse_text(fmt, render(fmt, ops, size), size="6G").ops
        got = triples(back)
        # a range across the end of low memory comes back as two
        merged = []
        for o, n, a in got:
            if merged and merged[-1][0] + merged[-1][1] == o and merged[-1][2] == a and o == 2 * G:
                merged[-1] = (merged[-1][0], merged[-1][1] + n, a)
            else:
                merged.append((o, n, a))
        assert merged == triples(ops), fmt


# -- bad input -----------------------------------------------------------------------------

BAD = [
    ("trace-cmd", tc("kvm_vm_set_mem_attributes: 0x10 -- zz [0x8]"), 3, "kvm_vm_set_mem_attributes"),
    ("trace-cmd", tc("kvm_vm_set_mem_attributes: 0x10 -- 0x10 [0x8]"), 3, "empty"),
    ("trace-cmd", tc("kvm_vm_set_mem_attributes: 0x10 -- 0x11 [0x9]"), 3, "other than PRIVATE"),
    ("trace-cmd", tc("kvm_hypercall: nr 0xc a0 0x1000"), 3, "kvm_hypercall"),
    ("trace-cmd", tc("kvm_hypercall: nr 0xc a0 0x1001 a1 0x1 a2 0x0 a3 0x0"), 3, "page aligned"),
    ("trace-cmd", tc("kvm_vmgexit_msr_protocol_enter: vcpu x"), 3, "ghcb_gpa"),
    ("trace-cmd", tc("kvm_exit: vcpu 0") + "garbage after the events\n", 4, "not a trace-cmd report line"),
    ("bpftrace", "Attaching 3 probes...\n1 attrs 10 11\n", 2, "takes 3"),
    ("bpftrace", "1 attrs 10 11 8\nhello\n", 2, "not a line of"),
    ("bpftrace", "1 map_gpa 1000 0 10\n", 1, "0 pages"),
    ("qemu", "kvm_convert_memory start 0x1000 size 0x1000 sideways\n", 1, "kvm_convert_memory"),
    ("qemu", "x\nkvm_convert_memory start 0x1000 size 0x0 shared_to_private\n", 2, "whole pages"),
    ("qemu", "ram_block_attributes_state_change offset 0x0 size 0x1000 from 'a' to 'b'\n", 1,
     "ram_block_attributes_state_change"),
]


@pytest.mark.parametrize("fmt, text, line, match", BAD)
def test_bad_lines_name_the_file_and_line(tmp_path, fmt, text, line, match):
    path = tmp_path / "rec.txt"
    path.write_text(text)
    with pytest.raises(TraceError, match=match) as ei:
        import_trace(fmt, path)
    assert ei.value.line == line and str(ei.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_conversions_is_an_error(tmp_path, fmt):
    path = tmp_path / "empty.txt"
    path.write_text("cpus=2\n" if fmt == "trace-cmd" else "\n")
    with pytest.raises(TraceError, match="no conversions found"):
        import_trace(fmt, path)


def test_binary_file(tmp_path):
    path = tmp_path / "trace.dat"
    path.write_bytes(b"\x00\xff\xfe" * 100)
    with pytest.raises(TraceError, match="not a text file"):
        import_trace("trace-cmd", path)


# -- the command ---------------------------------------------------------------------------

def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_import_command(capsys, tmp_path, maker, suffix):
    out = tmp_path / f"t{suffix}"
    code, text, err = run(capsys, "import", "trace-cmd", str(EXAMPLES / maker.FILES["trace-cmd"]),
                          "-o", str(out))
    assert code == 0, err
    assert "imported 48 conversions" in text and "kvm_vm_set_mem_attributes" in text
    ops = read_trace(out)
    assert triples(ops) == triples(maker.conversions())
    assert ops.guest["size"] == "4G" and ops.guest["platform"] == "snp"
    code, text, err = run(capsys, "run", str(out), "--platform", "tdx", "--tracking", "in-place",
                          "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(text)["extra"]["records"] == 48


def test_import_command_json(capsys, tmp_path, maker):
    out = tmp_path / "t.jsonl"
    code, text, err = run(capsys, "import", "qemu", str(EXAMPLES / maker.FILES["qemu"]), "-o", str(out),
                          "--size", "8G", "--platform", "tdx", "--json")
    assert code == 0, err
    d = json.loads(text)
    assert d["command"] == "import" and d["conversions"] == d["records"] == 48
    assert d["guest"] == {"size": "8G", "platform": "tdx"} and not d["size_inferred"]
    assert d["events"]["ram_block_attributes_state_change"] == 48


@pytest.mark.parametrize("argv, match", [
    (["import", "bpftrace", "{bad}", "-o", "{out}"], "bad.txt:2: not a line of"),
    (["import", "bpftrace", "{missing}", "-o", "{out}"], "no such file"),
    (["import", "bpftrace", "{good}", "-o", "{nodir}"], "does not exist"),
    (["import", "bpftrace", "{good}", "-o", "{out}", "--size", "lots"], "--size lots"),
    (["import", "perf", "{good}", "-o", "{out}"], "invalid choice"),
])
def test_import_command_bad_input(capsys, tmp_path, argv, match):
    files = {"bad": tmp_path / "bad.txt", "good": tmp_path / "good.txt", "out": tmp_path / "out.jsonl",
             "missing": tmp_path / "missing.txt", "nodir": tmp_path / "no" / "out.jsonl"}
    files["bad"].write_text("1 attrs 0 1 8\nnot bpftrace\n")
    files["good"].write_text("1 attrs 0 1 8\n")
    code, out, err = run(capsys, *[a.format(**{k: str(v) for k, v in files.items()}) for a in argv])
    assert code == 2 and match in err and out == ""
    assert err.strip().splitlines()[-1].startswith("gmemfast") and "Traceback" not in err
    assert not files["out"].exists()
    assert not list(tmp_path.glob(".gmemfast-import-*"))
