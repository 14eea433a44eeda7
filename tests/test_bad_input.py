"""Bad input, class by class, through the command and through the library.

Through the command every case must give exit status 2, exactly one line on stderr
naming the value and why, no traceback, nothing on stdout, and no output file (a
``--record`` or ``--plot`` file, or a temporary one next to it). Through the library
the same input raises the error class the API documents, with the same message.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gmemfast import (GUEST_MEMFD_FLAG_MMAP, VM, GmemError, GuestMemfd, cli)
from gmemfast import scenarios as S
from gmemfast import trace as T
from gmemfast.platforms.vmsa import MAX_VCPUS, check_vcpus

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HUGE = "99999999T"


def cli_run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, tmp_path, argv, match, *, record=True):
    """Exit 2, one line on stderr matching ``match``, no stdout, no file written."""
    before = set(os.listdir(tmp_path))
    extra = ["--record", tmp_path / "rec.jsonl"] if record and argv[0] == "run" else []
    code, out, err = cli_run(capsys, *argv, *extra)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("gmemfast") and "error:" in lines[0], err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err and out == ""
    assert set(os.listdir(tmp_path)) == before, "an output file was left behind"
    return lines[0]


def write(tmp_path, name, text, *, bom=False) -> Path:
    p = tmp_path / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return p


def toml_file(tmp_path, steps: str, head: str = "[guest]\nsize = '64M'\n", name="bad.toml") -> Path:
    return write(tmp_path, name, head + steps)


# ------------------------------------------------------------ numbers beyond the engine's limits

@pytest.mark.parametrize("argv,match", [
    (["run", "boot", "--size", HUGE], r"argument --size: .*99999999T.* larger than the model's largest guest, "
                                      r"4194302G"),
    (["run", "boot", "--size", "64M", "--kernel", HUGE], r"--kernel: .*larger than 128P \(2\^57 bytes\)"),
    (["run", "swiotlb-churn", "--size", "64M", "--granule", HUGE], r"--granule: .*larger than 128P"),
    (["run", "balloon", "--size", "1G", "-p", f"balloon={HUGE}"], r"balloon: .*larger than 128P"),
    (["run", "fragmentation", "--size", "1G", "--conversions", "1e30"], r"--conversions: .*at most 268,435,456"),
    (["run", "boot", "--size", "64M", "--vcpus", "5000"], r"--vcpus: .*at most 4096 \(KVM_MAX_VCPUS\)"),
    (["launch", "snp", "--ovmf", "synthetic", "--vcpus", "5000"], r"--vcpus: .*at most 4096"),
    (["compare", "boot", "--size", "64M", "--vary", f"size=1G,{HUGE}"], r"99999999T.*largest guest"),
])
def test_numbers_beyond_limits_on_the_command_line(capsys, tmp_path, argv, match):
    assert_refused(capsys, tmp_path, argv, match)


@pytest.mark.parametrize("step,match", [
    ("op = 'punch'\noffset = 18446744073709551616\nsize = 4096\n", r"step 1 \(punch\): offset: .*larger than 128P"),
    (f"op = 'punch'\noffset = 0\nsize = '{HUGE}'\n", r"step 1 \(punch\): size: .*larger than 128P"),
    ("op = 'pin'\noffset = 0\nsize = 18446744073709551616\n", r"\(pin\): size: .*larger than 128P"),
    ("op = 'convert'\noffset = 0\nsize = 4096\nattrs = 'shared'\nflags = 99999999999999999999\n",
     r"\(convert\): flags: .*below 2\^63"),
    ("op = 'write'\noffset = 0\nsize = '1G'\n", r"\(write\): size: .*at most 256M"),
    ("op = 'random'\ncount = 1_000_000_000_000\n", r"\(random\): count: .*at most 268,435,456"),
    (f"op = 'swiotlb'\nsize = '{HUGE}'\n", r"\(swiotlb\): size: .*larger than 128P"),
    ("op = 'launch'\nvcpus = 100000\n", r"\(launch\): vcpus: .*at most 4096"),
])
def test_numbers_beyond_limits_in_a_scenario_file(capsys, tmp_path, step, match):
    f = toml_file(tmp_path, "[[steps]]\n" + step)
    line = assert_refused(capsys, tmp_path, ["run", f], match)
    assert "bad.toml: step 1" in line
    with pytest.raises(S.ScenarioError, match=match):        # the library: the same message
        S.load_scenario_file(f)


@pytest.mark.parametrize("name,text,match", [
    ("t.jsonl", '{"op": "punch", "offset": 18446744073709551616, "size": 4096}\n',
     r"t.jsonl:1: offset: .*larger than 128P"),
    ("t.jsonl", '{"op": "guest", "size": "64M"}\n{"op": "allocate", "offset": 0, "size": "%s"}\n' % HUGE,
     r"t.jsonl:2: size: .*larger than 128P"),
    ("t.jsonl", '{"op": "unpin", "offset": 99999999999999999999999}\n', r"t.jsonl:1: offset: .*128P"),
    ("t.jsonl", '{"op": "read", "offset": 0, "size": "512M"}\n', r"t.jsonl:1: size: .*at most 256M"),
    ("t.csv", "op,offset,size\npunch,0,%s\n" % HUGE, r"t.csv:2: size: .*larger than 128P"),
    ("t.csv", "op,offset,size,attrs,flags\nconvert,0,4K,shared,99999999999999999999999\n",
     r"t.csv:2: flags: .*below 2\^63"),
    ("t.jsonl", '{"op": "guest", "size": "%s"}\n{"op": "punch", "offset": 0, "size": 4096}\n' % HUGE,
     r"t.jsonl: guest: parameter size: .*largest guest"),
])
def test_numbers_beyond_limits_in_a_trace(capsys, tmp_path, name, text, match):
    f = write(tmp_path, name, text)
    assert_refused(capsys, tmp_path, ["run", f, "--size", "64M"] if "guest" not in match else ["run", f], match)
    with pytest.raises((T.TraceError, S.ScenarioError), match=match.split(":", 1)[1] if ":" in match else match):
        S.run_trace(f, {"size": "64M"} if "guest" not in match else None)


def test_numbers_beyond_limits_in_the_library():
    with pytest.raises(GmemError, match=r"larger than 128P \(2\^57 bytes\)") as ei:
        GuestMemfd(HUGE)
    assert ei.value.errno == 22
    with pytest.raises(ValueError, match=r"offset: .*larger than 128P"):
        T.parse_number(1 << 64, "offset", limit=1 << 57)
    assert T.parse_number(1 << 57, "offset", limit=1 << 57) == 1 << 57      # the limit itself is fine
    with pytest.raises(S.ScenarioError, match="parameter size: .*largest guest"):
        S.run_scenario("boot", {"size": HUGE})
    assert S.MAX_GUEST_SIZE == (1 << 52) - (2 << 30)
    with pytest.raises(ValueError, match="at most 4096"):
        check_vcpus(MAX_VCPUS + 1)
    assert check_vcpus(MAX_VCPUS) == MAX_VCPUS


def test_largest_guest_is_accepted_and_one_page_more_is_refused():
    p = S.target_params("boot", {"size": S.MAX_GUEST_SIZE})
    assert p["size"] == S.MAX_GUEST_SIZE
    with pytest.raises(S.ScenarioError, match="largest guest"):
        S.target_params("boot", {"size": S.MAX_GUEST_SIZE + 4096})


# ------------------------------------------------------------ hostile JSON lines

@pytest.mark.parametrize("line,match", [
    ("[" * 100_000 + "]" * 100_000, r"t.jsonl:2: not valid JSON \(nested too deeply\)"),
    ('{"op": "punch", "offset": %s, "size": 4096}' % ("9" * 5000), r"t.jsonl:2: not valid JSON"),
    ('{"op": "punch", "offset": NaN, "size": 4096}', r"t.jsonl:2: offset: expected a number"),
    ('{"op": "punch", "offset": ', r"t.jsonl:2: not valid JSON"),
    ('{"op": "pin", "offset": 0, "id": {"a": [1]}}', r"t.jsonl:2: id: expected a name"),
    ('{"op": {"nested": true}}', r"t.jsonl:2: unknown op"),
])
def test_hostile_json_lines(capsys, tmp_path, line, match):
    f = write(tmp_path, "t.jsonl", '{"op": "guest", "size": "64M"}\n' + line + "\n")
    assert_refused(capsys, tmp_path, ["run", f], match)
    with pytest.raises(T.TraceError, match=match):
        T.read_trace(f)


def test_bad_csv_rows(capsys, tmp_path):
    f = write(tmp_path, "t.csv", "op,offset,size\npunch,0,4K\n" + "allocate,0," + "x" * 200_000 + "\n")
    assert_refused(capsys, tmp_path, ["run", f, "--size", "64M"], r"t.csv:3: not valid CSV")
    f = write(tmp_path, "n.csv", "op,offset,size\npunch,0,4\0K\n")
    assert_refused(capsys, tmp_path, ["run", f, "--size", "64M"], r"n.csv:2: size: cannot read")


# ------------------------------------------------------------ wrong types in scenario files

@pytest.mark.parametrize("text,match", [
    ("guest = 5\n[[steps]]\nop = 'accept'\n", r"'guest' must be a table \(\[guest\]\), not int 5"),
    ("cost = 3\n[[steps]]\nop = 'accept'\n", r"'cost' must be a table"),
    ("scenario = 'x'\n[[steps]]\nop = 'accept'\n", r"'scenario' must be a table"),
    ("[cost]\nset = 'fast'\n[[steps]]\nop = 'accept'\n", r"\[cost\]: set must be a table"),
    ("[cost]\nset = {guest_exits = 'fast'}\n[[steps]]\nop = 'accept'\n",
     r"\[cost\]: set: override guest_exits: a figure must be a number of nanoseconds, not str"),
    ("[cost]\nset = {guest_exit = 1.0}\n[[steps]]\nop = 'accept'\n",
     r"unknown counter name.*'guest_exit' \(did you mean 'guest_exits'\?\).*gmemfast counters"),
    ("[cost]\nset = {guest_exits = -1.0}\n[[steps]]\nop = 'accept'\n", r"guest_exits: .*>= 0"),
    ("[cost]\nprofile = 5\n[[steps]]\nop = 'accept'\n", r"\[cost\]: profile must be text, not int 5"),
    ("[cost]\nprofile = 'nowhere.toml'\n[[steps]]\nop = 'accept'\n", r"\[cost\]: profile .*nowhere.toml.: no such"),
    ("[scenario]\nname = 5\n[[steps]]\nop = 'accept'\n", r"\[scenario\]: name must be text"),
    ("[guest]\nsize = 5.5\n[[steps]]\nop = 'accept'\n", r"\[guest\]: parameter size: .*not float"),
    ("[guest]\nin_place = 'maybe'\n[[steps]]\nop = 'accept'\n", r"\[guest\]: expected true or false"),
    ("[guest]\nseed = -1\n[[steps]]\nop = 'accept'\n", r"\[guest\]: parameter seed: .*>= 0"),
    ("steps = [1, 2]\n", r"steps must be tables"),
    ("steps = 5\n", r"steps must be tables"),
    ("[[steps]]\nop = 5\n", r"step 1: unknown op 5"),
    ("[[steps]]\nop = 'pin'\noffset = 0\nid = [1]\n", r"step 1 \(pin\): id: expected a name"),
    ("[[steps]]\nop = 'launch'\novmf = 5\n", r"step 1 \(launch\): ovmf: expected a file name"),
    ("[[steps]]\nop = 'trace'\nfile = 5\n", r"step 1 \(trace\): file: expected a file name"),
    ("[[steps]]\nop = 'trace'\nfile = 'none.jsonl'\n", r"step 1 \(trace\): .*none.jsonl: cannot read"),
    ("[[steps]]\nop = 'balloon'\nsize = 'lots%'\n", r"step 1 \(balloon\): size: 'lots%' is not a percentage"),
    ("[[steps]]\nop = 'churn'\noffset = 0\nsize = '1M'\norder = 'backwards'\n",
     r"step 1 \(churn\): order: 'backwards' is not one of random, sequential"),
    ("[[steps]]\nop = 'convert'\noffset = 0\nsize = '4K'\nattrs = 'maybe'\n", r"step 1 \(convert\): attrs:"),
    ("[[steps]]\nop = 'accept'\nphase = ''\n", r"step 1 \(accept\): phase: expected a name"),
    ("[expect]\nerrors = 'lots'\n[[steps]]\nop = 'accept'\n", r"\[expect\]: errors: 'lots' is not NAME:COUNT"),
    ("[expect]\nerrors = {EAGIAN = 1}\n[[steps]]\nop = 'accept'\n", r"'EAGIAN' is not an errno name.*EAGAIN"),
    ("[expect]\nerrors = {EAGAIN = -1}\n[[steps]]\nop = 'accept'\n", r"errors.EAGAIN: a count is >= 0"),
    ("[expect]\nfailures = 1\n[[steps]]\nop = 'accept'\n", r"\[expect\]: unknown key\(s\) failures"),
    ("a = [" * 2000 + "]" * 2000 + "\n", r"not valid TOML"),
])
def test_wrong_types_in_a_scenario_file(capsys, tmp_path, text, match):
    f = write(tmp_path, "bad.toml", text)
    line = assert_refused(capsys, tmp_path, ["run", f], match)
    assert "bad.toml" in line
    with pytest.raises(S.ScenarioError, match=match):
        S.run_scenario_file(f)


def test_unreadable_files(capsys, tmp_path):
    (tmp_path / "dir.toml").mkdir()
    assert_refused(capsys, tmp_path, ["run", tmp_path / "dir.toml"], r"dir.toml: cannot read")
    (tmp_path / "dir.csv").mkdir()
    assert_refused(capsys, tmp_path, ["run", tmp_path / "dir.csv"], r"dir.csv: cannot read")
    bin_file = write(tmp_path, "bin.toml", "")
    bin_file.write_bytes(b"\xff\xfe\x00")
    assert_refused(capsys, tmp_path, ["run", bin_file], r"bin.toml: not a text file")


# ------------------------------------------------------------ counts that would exhaust memory

def test_huge_counts_are_refused_before_anything_runs(capsys, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(S.Runner, "sample", lambda self: ran.append(1))
    f = toml_file(tmp_path, "[[steps]]\nop = 'accept'\n[[steps]]\nop = 'random'\ncount = 1e12\n")
    assert_refused(capsys, tmp_path, ["run", f], r"step 2 \(random\): count: .*at most 268,435,456")
    # a churn over all of a 4T guest at 4K: 2^30 pieces, known only with the guest's size
    f = toml_file(tmp_path, "[[steps]]\nop = 'accept'\n[[steps]]\nop = 'churn'\noffset = 0\nsize = 'all'\n",
                  head="[guest]\nsize = '4T'\n")
    assert_refused(capsys, tmp_path, ["run", f], r"step 2 \(churn\): .*1,073,741,824 pieces, at most 268,435,456")
    f = toml_file(tmp_path, "[[steps]]\nop = 'balloon'\nsize = '25%'\ngranule = '4K'\n", head="[guest]\nsize = '2T'\n")
    assert_refused(capsys, tmp_path, ["run", f], r"step 1 \(balloon\): .*at most 268,435,456")
    assert ran == [], "something ran before the input was refused"
    # a smaller guest takes the same file
    assert S.run_scenario_file(f, {"size": "64M"}).summary["errors"] == {}


# ------------------------------------------------------------ zero and negative counts

@pytest.mark.parametrize("argv,match", [
    (["run", "boot", "--size", "64M", "--vcpus", "0"], r"argument --vcpus: expected a count of at least 1, not '0'"),
    (["launch", "snp", "--ovmf", "synthetic", "--vcpus", "0"], r"argument --vcpus: expected a count of at least 1"),
    (["run", "swiotlb-churn", "--size", "64M", "--in-flight", "0"], r"argument --in-flight: .*at least 1"),
    (["run", "fragmentation", "--size", "1G", "--window", "0"], r"argument --window: .*at least 1, not '0'"),
    (["run", "fragmentation", "--size", "1G", "--window", "-5"], r"argument --window: .*at least 1, not '-5'"),
    (["run", "fragmentation", "--size", "1G", "--conversions", "0"], r"argument --conversions: .*at least 1"),
    (["run", "balloon", "--size", "1G", "--rounds", "0"], r"argument --rounds: .*at least 1"),
    (["run", "balloon", "--size", "1G", "-p", "rounds=-1"], r"parameter rounds: .*at least 1"),
    (["run", "boot", "--size", "64M", "--seed", "-1"], r"argument --seed: a seed is an integer >= 0"),
    (["compare", "fragmentation", "--size", "1G", "--vary", "window=10,0"], r"--vary window=10,0: the value '0'"),
])
def test_zero_and_negative_counts_on_the_command_line(capsys, tmp_path, argv, match):
    assert_refused(capsys, tmp_path, argv, match)


@pytest.mark.parametrize("step,match", [
    ("op = 'accept'\nrepeat = 0\n", r"\(accept\): repeat: expected a count of at least 1, not 0"),
    ("op = 'churn'\noffset = 0\nsize = '1M'\niterations = 0\n", r"\(churn\): iterations: .*at least 1"),
    ("op = 'random'\ncount = 10\nwindow = 0\n", r"\(random\): window: .*at least 1"),
    ("op = 'random'\ncount = 0\n", r"\(random\): count: .*at least 1"),
    ("op = 'random'\ncount = 10\nseed = -1\n", r"\(random\): seed: .*>= 0"),
    ("op = 'balloon'\nsize = '25%'\nrounds = 0\n", r"\(balloon\): rounds: .*at least 1"),
    ("op = 'launch'\nvcpus = 0\n", r"\(launch\): vcpus: .*at least 1"),
    ("op = 'launch'\nvcpus = -2\n", r"\(launch\): vcpus: .*at least 1"),
])
def test_zero_and_negative_counts_in_a_scenario_file(capsys, tmp_path, step, match):
    f = toml_file(tmp_path, "[[steps]]\n" + step)
    assert_refused(capsys, tmp_path, ["run", f], match)
    with pytest.raises(S.ScenarioError, match=match):
        S.load_scenario_file(f)


@pytest.mark.parametrize("value", [0, -1, 2.5, "4", True])
def test_pages_per_populate_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=f"pages_per_populate must be an integer of at least 1.*{value!r}"):
        VM("snp", pages_per_populate=value)
    with pytest.raises(ValueError, match="pages_per_populate"):
        GuestMemfd("2M", vm_type="snp", pages_per_populate=value)
    assert VM("snp", pages_per_populate=3).pages_per_populate == 3


def test_zero_counts_in_the_library():
    for params in ({"window": 0}, {"conversions": 0}, {"window": -1}):
        with pytest.raises(S.ScenarioError, match=f"parameter {next(iter(params))}: .*at least 1"):
            S.run_scenario("fragmentation", {"size": "1G", **params})
    with pytest.raises(ValueError, match="vcpus must be an int of at least 1"):
        check_vcpus(0)


# ------------------------------------------------------------ batched calls, byte-order marks

def test_batched_arrays_of_different_lengths_name_both():
    g = GuestMemfd("64M", GUEST_MEMFD_FLAG_MMAP)
    offs = np.arange(3) * 4096
    with pytest.raises(ValueError, match=r"sizes has 2 items but offsets has 3"):
        g.set_memory_attributes_many(offs, np.array([4096, 4096]), 0)
    with pytest.raises(ValueError, match=r"attributes has 5 items but offsets has 3"):
        g.set_memory_attributes_many(offs, 4096, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"flags has 1 items but offsets has 3"):
        g.set_memory_attributes_many(offs, 4096, 0, np.zeros(1, np.int64))
    before = g.dump()
    assert g.set_memory_attributes_many(offs, 4096, 0).ok          # scalars broadcast
    assert not np.array_equal(before["private"], g.dump()["private"])


@pytest.mark.parametrize("name,text", [
    ("bom.toml", "[guest]\nsize = '64M'\n[[steps]]\nop = 'accept'\n[[steps]]\nop = 'punch'\noffset = 0\nsize = '2M'\n"),
    ("bom.csv", "op,offset,size\naccept,0,all\npunch,0,2M\n"),
    ("bom.jsonl", '{"op": "accept", "offset": 0, "size": "all"}\n{"op": "punch", "offset": 0, "size": "2M"}\n'),
])
def test_a_byte_order_mark_is_accepted(capsys, tmp_path, name, text):
    plain = write(tmp_path, "plain" + Path(name).suffix, text)
    bom = write(tmp_path, name, text, bom=True)
    results = []
    for f in (plain, bom):
        code, out, err = cli_run(capsys, "run", f, "--size", "64M", "--json")
        assert code == 0, err
        results.append(json.loads(out)["summary"])
    assert results[0] == results[1] and results[0]["allocated_pages"] == (64 << 20) // 4096 - 512


# ------------------------------------------------------------ --plot, --record, --ovmf, --vary

def test_plot_into_a_directory(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = cli_run(capsys, "run", "boot", "--size", "64M", "--kernel", "0", "--plot", tmp_path)
    assert code == 0, err
    assert (tmp_path / "boot.png").read_bytes()[:4] == b"\x89PNG"
    assert f"plot saved to {tmp_path / 'boot.png'}" in out
    code, out, err = cli_run(capsys, "run", "boot", "--size", "64M", "--kernel", "0", "--plot", tmp_path / "noext")
    assert code == 0 and (tmp_path / "noext.png").exists() and not (tmp_path / "noext").exists()
    assert f"plot saved to {tmp_path / 'noext.png'}" in out         # the path really written
    code, out, err = cli_run(capsys, "compare", EXAMPLES / "bounce-trace.csv", "--vary", "page_order=9,18",
                             "--plot", tmp_path)
    assert code == 0 and (tmp_path / "bounce-trace-compare.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["boot.png", "bounce-trace-compare.png", "noext.png"]


def test_plot_and_record_paths_refused_up_front(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert_refused(capsys, tmp_path, ["run", "boot", "--size", "64M", "--plot", tmp_path / "x.txt"],
                   r"--plot .*x.txt: matplotlib cannot write .txt files")
    assert_refused(capsys, tmp_path, ["run", "boot", "--size", "64M", "--plot", tmp_path / "no" / "x.png"],
                   r"folder .* does not exist", record=False)
    assert_refused(capsys, tmp_path, ["run", "boot", "--size", "64M", "--record", tmp_path], r"is a directory",
                   record=False)


def test_no_output_file_left_when_a_later_output_fails(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import gmemfast.plot as P

    def broken(res, path):
        Path(path).write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(P, "plot_result", broken)
    code, out, err = cli_run(capsys, "run", "boot", "--size", "64M", "--kernel", "0",
                             "--record", tmp_path / "ops.csv", "--plot", tmp_path / "p.png")
    assert code == 1 and "No space left" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []        # neither the record nor the picture, nor temporaries


@pytest.mark.parametrize("what", ["dir", "devnull"])
def test_launch_ovmf_not_a_regular_file(capsys, tmp_path, what):
    path = tmp_path if what == "dir" else "/dev/null"
    expect = "is a directory" if what == "dir" else "is not a regular file"
    assert_refused(capsys, tmp_path, ["launch", "snp", "--ovmf", path], f"--ovmf {path} {expect}")


def test_launch_bad_vcpu_and_vmm_types(capsys, tmp_path):
    assert_refused(capsys, tmp_path, ["launch", "snp", "--ovmf", "synthetic", "--vcpu-type", "Pentium"],
                   r"argument --vcpu-type: invalid choice: 'Pentium'")
    assert_refused(capsys, tmp_path, ["launch", "snp", "--ovmf", "synthetic", "--vmm-type", "bochs"],
                   r"argument --vmm-type: 'bochs' is not one of QEMU, EC2, GCE")


def test_compare_vary_names_the_bad_value_and_runs_nothing(capsys, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(S.Runner, "finish", lambda *a: ran.append(1))
    assert_refused(capsys, tmp_path, ["compare", "boot", "--size", "64M", "--vary", "size=1G,zz"],
                   r"--vary size=1G,zz: the value 'zz' is not valid: cannot read size 'zz'")
    assert_refused(capsys, tmp_path, ["compare", "boot", "--size", "64M", "--vary", "page_order=9,7"],
                   r"the value '7' is not valid: page order 7")
    # values valid alone but not together with the other options: found before running
    assert_refused(capsys, tmp_path, ["compare", "boot", "--size", "64M", "--vary", "page_order=9,18"],
                   r"configuration page_order=18: .*not a multiple of the backing page size 1G")
    assert ran == []


# ------------------------------------------------------------ the library, through the API

def test_library_errors_name_the_parameter():
    with pytest.raises(S.ScenarioError, match="parameter in_flight: expected a count of at least 1"):
        S.run_scenario("swiotlb-churn", {"size": "64M", "in_flight": 0})
    with pytest.raises(S.ScenarioError, match="parameter vcpus: .*at most 4096"):
        S.run_scenario("boot", {"size": "64M", "vcpus": 10**6})
    with pytest.raises(S.ScenarioError, match=r"^cost profile: override guest_exits: a figure must be a number"):
        S.run_scenario("boot", {"size": "64M"}, cost_overrides={"guest_exits": "fast"})


def test_python_dash_m_bad_input_has_no_traceback(tmp_path):
    f = write(tmp_path, "t.jsonl", "[" * 50_000 + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "gmemfast", "run", str(f)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"gmemfast: error: {f}:1: not valid JSON (nested too deeply)"]


def test_builtin_balloon_too_many_blocks_is_refused_before_it_runs(capsys, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(S.Runner, "accept", lambda *a, **k: ran.append(1))
    assert_refused(capsys, tmp_path, ["run", "balloon", "--size", "2T", "--granule", "4K"],
                   r"granule 4K: the guest holds 536,870,912 such blocks, at most 268,435,456")
    assert ran == []


def test_a_profile_file_with_a_byte_order_mark(capsys, tmp_path):
    from gmemfast.cost import CostModel
    text = "[profile]\nname = 'mine'\n[counters.guest_exits]\nns = 1500.0\nsource = 'estimate: one exit'\n"
    f = write(tmp_path, "mine.toml", text, bom=True)
    assert CostModel.from_profile(f).ns_per_unit["guest_exits"] == 1500.0
    code, out, err = cli_run(capsys, "counters", "--profile", f, "--json")
    assert code == 0 and json.loads(out)["profile"] == "mine"
