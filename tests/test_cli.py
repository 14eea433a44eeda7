"""The gmemfast command: every subcommand, exit codes, JSON schema, errors, plots."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL
from gmemfast import cli
from gmemfast import scenarios as S
from gmemfast.firmware import synthetic_ovmf
from gmemfast.launch import snp_measure_ovmf, tdx_measure_ovmf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_help_lists_subcommands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("run", "compare", "launch", "scenarios"):
        assert name in out
    code, out, _ = run(capsys, "run", "--help")
    assert code == 0 and "--page-order" in out and "--conversions" in out and "--plot" in out


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "required" in err


def test_run_table(capsys):
    code, out, err = run(capsys, "run", "boot", "--size", "256M", "--kernel", "1M", "--no-progress")
    assert code == 0, err
    for text in ("estimated time by operation", "launch", "accept", "swiotlb", "counters",
                 "huge pages left", "direct-map entries", "SNP launch digest"):
        assert text in out


RUN_KEYS = {"command", "scenario", "description", "params", "profile", "total_ns", "phases", "counters",
            "estimate", "summary", "timeline", "extra", "wall_seconds"}
SUMMARY_KEYS = {"guest_size", "guest_pages", "private_pages", "shared_pages", "allocated_pages",
                "huge_pages_left", "huge_pages_max", "direct_map", "direct_map_entries",
                "attribute_ranges", "operations", "errors"}


def test_run_json_schema(capsys):
    d = run_json(capsys, "run", "fragmentation", "--size", "4G", "--conversions", "2000", "--window", "500",
                 "--platform", "tdx", "--page-order", "2M", "--direct-map", "no-direct-map", "--seed", "3")
    assert set(d) >= RUN_KEYS
    assert d["command"] == "run" and d["scenario"] == "fragmentation"
    assert d["params"] == {**d["params"], "size": 4 << 30, "platform": "tdx", "page_order": 9,
                           "direct_map": "no-direct-map", "seed": 3, "conversions": 2000, "window": 500}
    assert set(d["summary"]) >= SUMMARY_KEYS
    assert set(d["summary"]["direct_map"]) == {"1G", "2M", "4K"}
    assert d["profile"] == "tdx"
    assert set(d["phases"]) >= {"accept", "to-shared", "to-private"}
    for ph in d["phases"].values():
        assert set(ph) == {"ns", "cpu_ns", "wall_ns", "threads", "limited_by", "bounds", "counters"}
        assert ph["ns"] == ph["cpu_ns"] >= ph["wall_ns"] > 0
    assert d["total_ns"] == d["cpu_ns"] >= d["wall_ns"] > 0 and d["vcpus"] == 1
    assert set(d["estimate"]) >= {"profile", "total_ns", "counters", "by_operation"}
    assert d["timeline"] and set(d["timeline"][0]) >= {"step", "huge_pages", "dmap_4k", "est_ns"}


def test_run_options_change_the_run(capsys):
    a = run_json(capsys, "run", "boot", "--size", "1G", "--kernel", "0")
    b = run_json(capsys, "run", "boot", "--size", "1G", "--kernel", "0", "--legacy")
    assert a["params"]["tracking"] == "in-place" and b["params"]["tracking"] == "legacy"
    assert b["counters"]["attr_writes_page"] > 0
    c = run_json(capsys, "run", "boot", "--size", "1G", "--kernel", "0", "--set", "snp_pvalidate_4k=0",
                 "--profile", "snp")
    assert c["total_ns"] < a["total_ns"] and c["wall_ns"] < a["wall_ns"]
    t1, t8 = (run_json(capsys, "run", "boot", "--size", "1G", "--kernel", "0", "--platform", "tdx",
                       "--vcpus", v) for v in ("1", "8"))
    assert t8["counters"] == t1["counters"] and t8["cpu_ns"] == t1["cpu_ns"]
    assert t8["wall_ns"] < t1["wall_ns"] and t8["phases"]["accept"]["threads"] == 8
    d = run_json(capsys, "run", "boot", "--size", "1G", "--kernel", "0", "-p", "accept_chunk=4K")
    # 4 KiB host mappings: 4 KiB validations either way, but no refused 2 MiB ones
    assert d["counters"]["snp_pvalidate_4k"] == a["counters"]["snp_pvalidate_4k"]
    assert a["counters"]["accept_fallbacks"] > 0 and d["counters"].get("accept_fallbacks", 0) == 0


@pytest.mark.parametrize("argv,match", [
    (["run", "boot", "--size", "3Q"], "--size"),
    (["run", "boot", "--platform", "sev"], "--platform"),
    (["run", "boot", "--page-order", "7"], "--page-order"),
    (["run", "boot", "--direct-map", "sometimes"], "--direct-map"),
    (["run", "boot", "--bogus"], "unrecognized arguments"),
    (["run", "boot", "--window", "10"], "--window: not a parameter of scenario 'boot'"),
    (["run", "boot", "-p", "colour=red"], "--colour: not a parameter"),
    (["run", "boot", "-p", "novalue"], "NAME=VALUE"),
    (["run", "bot"], "unknown scenario 'bot'"),
    (["run", "boot", "--set", "nothing=3"], "unknown counter"),
    (["run", "boot", "--set", "guest_exits=fast"], "not a number"),
    (["run", "boot", "--profile", "nowhere"], "cost profile"),
    (["run", "boot", "--tracking", "legacy", "--flow", "in-place"], "needs tracking 'in-place'"),
    (["run", "boot", "--size", "3M", "--page-order", "9"], "multiple of the backing page size"),
    (["run", "missing.toml"], "does not exist"),
    (["run", "boot", "--plot", "/no/such/folder/x.png"], "does not exist"),
    (["compare", "boot", "--vary", "size=1G"], "at least two"),
    (["compare", "boot", "--vary", "colour=a,b"], "not a parameter"),
    (["launch", "snp", "--ovmf", "/no/such/ovmf.fd"], "no such file"),
    (["launch", "sev"], "invalid choice"),
    (["launch", "snp", "--vcpus", "0"], "at least 1"),
    (["scenarios", "--bogus"], "unrecognized"),
    (["counters", "--profile", "nowhere"], "unknown cost profile 'nowhere'"),
    (["bench", "--quick", "--full"], "not allowed with argument"),
])
def test_bad_options_exit_2(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert match in err
    assert len(err.splitlines()) == 1, err       # one line: no usage block
    assert out == ""
    assert "Traceback" not in err


def test_bad_scenario_file_and_trace_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[steps]]\nop = 'fly'\n")
    code, _, err = run(capsys, "run", str(bad))
    assert code == 2 and "step 1: unknown op 'fly'" in err
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"op": "convert", "offset": 0, "size": 4096, "attrs": 0}\n{"op": "jump"}\n')
    code, _, err = run(capsys, "run", str(trace))
    assert code == 2 and "t.jsonl:2: unknown op 'jump'" in err


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(S, "run_any", interrupted)
    code, _, err = run(capsys, "run", "boot")
    assert code == 130 and "interrupted" in err


def test_compare(capsys):
    code, out, err = run(capsys, "compare", "fragmentation", "--size", "2G", "--conversions", "1000",
                         "--window", "200", "--vary", "direct_map=keep,on-conversion", "--no-progress")
    assert code == 0, err
    assert "direct_map=keep" in out and "direct_map=on-conversion" in out
    assert "wall time (elapsed)" in out and "cpu time (all work)" in out and "huge pages left" in out
    d = run_json(capsys, "compare", "fragmentation", "--size", "2G", "--conversions", "1000",
                 "--vary", "direct_map=keep,on-conversion", "--vary", "page_order=9,18")
    assert d["command"] == "compare" and len(d["configurations"]) == 4
    labels = [c["label"] for c in d["configurations"]]
    assert labels[0] == "direct_map=keep page_order=9"
    for c in d["configurations"]:
        assert set(c) >= RUN_KEYS - {"command"}
    keep = d["configurations"][0]["summary"]["direct_map"]
    onconv = d["configurations"][2]["summary"]["direct_map"]
    assert keep == {"1G": 2, "2M": 0, "4K": 0} and onconv["4K"] > 0


def test_compare_default_is_tracking(capsys):
    d = run_json(capsys, "compare", "boot", "--size", "1G", "--kernel", "0")
    assert [c["params"]["tracking"] for c in d["configurations"]] == ["in-place", "legacy"]
    m = {c["extra"]["measurement"] for c in d["configurations"]}
    assert len(m) == 1           # both flows measure the same launch
    code, out, _ = run(capsys, "compare", "boot", "--size", "1G", "--kernel", "0")
    assert code == 0 and "identical in every configuration" in out


@pytest.mark.parametrize("platform", ["snp", "tdx"])
def test_launch(capsys, tmp_path, platform):
    img = tmp_path / "OVMF.fd"
    img.write_bytes(synthetic_ovmf())
    expect = (snp_measure_ovmf if platform == "snp" else tdx_measure_ovmf)(synthetic_ovmf()).digest.hex()
    d = run_json(capsys, "launch", platform, "--ovmf", str(img))
    assert d["measurement"] == expect
    assert d["command"] == "launch" and d["total_ns"] > 0 and d["pages"] > 0
    assert set(d) >= {"platform", "ovmf", "flow", "measurement_kind", "counters", "estimate"}
    d2 = run_json(capsys, "launch", platform, "--ovmf", "synthetic", "--flow", "legacy")
    assert d2["measurement"] == expect
    code, out, _ = run(capsys, "launch", platform, "--ovmf", str(img))
    assert code == 0 and expect in out and "estimated launch: wall" in out
    assert d["wall_ns"] == d["cpu_ns"] == d["total_ns"]          # one VMM thread
    d3 = run_json(capsys, "launch", platform, "--ovmf", "synthetic", "--concurrent", "3")
    assert d3["concurrent"]["launches"] == 3 and d3["concurrent"]["cpu_ns"] == 3 * d3["cpu_ns"]
    if platform == "snp":        # the launches queue on the one PSP of the host
        assert d3["concurrent"]["limited_by"] == "psp"
        assert d3["concurrent"]["wall_ns"] > 2.9 * d3["wall_ns"]
    else:                        # TDX builds the TD on the VMM's own CPU: in parallel
        assert d3["concurrent"]["wall_ns"] == pytest.approx(d3["wall_ns"])


def test_launch_bad_image(capsys, tmp_path):
    img = tmp_path / "junk.fd"
    img.write_bytes(b"\0" * 4096)
    code, _, err = run(capsys, "launch", "snp", "--ovmf", str(img))
    assert code == 2 and "junk.fd" in err


def test_launch_without_ovmf(capsys, monkeypatch):
    import gmemfast.firmware as fw
    monkeypatch.setattr(fw, "find_ovmf_images", lambda: [])
    code, _, err = run(capsys, "launch", "snp")
    assert code == 2 and "--ovmf" in err


def test_scenarios_listing(capsys):
    code, out, _ = run(capsys, "scenarios")
    assert code == 0
    for name in S.SCENARIOS:
        assert name in out
    assert "--conversions" in out and "--page-order" in out
    d = run_json(capsys, "scenarios")
    names = [s["name"] for s in d["scenarios"]]
    assert names == list(S.SCENARIOS)
    frag = d["scenarios"][names.index("fragmentation")]
    assert frag["params"]["page_order"]["default"] == "18" and frag["params"]["size"]["common"]


def test_plot_files(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "frag.png"
    code, out, err = run(capsys, "run", "fragmentation", "--size", "2G", "--conversions", "500",
                         "--plot", str(png), "--no-progress")
    assert code == 0, err
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    png2 = tmp_path / "cmp.png"
    code, _, err = run(capsys, "compare", "balloon", "--size", "1G", "--vary", "page_order=9,18",
                       "--plot", str(png2), "--no-progress")
    assert code == 0, err
    assert png2.stat().st_size > 10_000


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "run", "boot", "--size", "64M", "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "gmemfast[plot]" in err
    assert not (tmp_path / "x.png").exists()


def test_record_and_replay(capsys, tmp_path):
    rec = tmp_path / "ops.csv"
    a = run_json(capsys, "run", "swiotlb-churn", "--size", "256M", "--conversions", "300",
                 "--record", str(rec))
    assert rec.exists()
    b = run_json(capsys, "run", str(rec))
    for key in ("private_pages", "allocated_pages", "direct_map", "huge_pages_left"):
        assert a["summary"][key] == b["summary"][key]
    c = run_json(capsys, "run", str(EXAMPLES / "bounce-trace.csv"), "--platform", "tdx")
    assert c["params"]["platform"] == "tdx" and c["summary"]["errors"] == {"EAGAIN": 1}


def test_scenario_file_run(capsys):
    d = run_json(capsys, "run", str(EXAMPLES / "balloon-cycles.toml"), "--size", "2G")
    assert d["scenario"] == "balloon-cycles" and d["params"]["size"] == 2 << 30
    assert d["profile"] == "tdx"


def test_progress_bar():
    buf = io.StringIO()
    p = cli.Progress(buf, enabled=True, delay=0.0, interval=0.0)
    p("accepting 5/10", 5, 10)
    p("accepting 10/10", 10, 10)
    text = buf.getvalue()
    assert "accepting 5/10" in text and "50.0%" in text and "100.0%" in text and "10/10" in text
    p.close()
    assert buf.getvalue().endswith("\r")
    quiet = io.StringIO()
    q = cli.Progress(quiet, enabled=True, delay=60.0)
    q("x", 1, 2)
    assert quiet.getvalue() == ""            # nothing before a second has passed
    off = io.StringIO()
    cli.Progress(off)("x", 1, 2)             # not a terminal: never shown
    assert off.getvalue() == ""


def test_register_command(capsys):
    seen = []

    def configure(p):
        p.add_argument("--n", type=int, default=1)

    def execute(args):
        seen.append(args.n)
        return 0
    n_before = len(cli.COMMANDS)
    try:
        cli.register_command("hello", "say hello", configure, execute)
        assert len(cli.COMMANDS) == n_before + 1
        code, out, _ = run(capsys, "--help")
        assert "hello" in out
        assert cli.main(["hello", "--n", "3"]) == 0 and seen == [3]
        cli.register_command("hello", "say hello again", configure, "gmemfast.cli:_cmd_scenarios")
        assert len(cli.COMMANDS) == n_before + 1
    finally:
        cli.COMMANDS[:] = [c for c in cli.COMMANDS if c.name != "hello"]


def test_python_dash_m():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "gmemfast", "scenarios"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "fragmentation" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gmemfast", "run", "boot", "--size", "xx"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--size" in r.stderr


def test_bench_runs_targets_against_baselines(capsys):
    pytest.importorskip("pyroaring")
    code, out, _ = run(capsys, "bench", "--only", "2", "--json")
    res = json.loads(out)
    (t,) = res["targets"]
    assert t["id"] == 2 and t["ratio"] > 0
    assert code == (0 if res["passed"] else 1)


@pytest.mark.parametrize("only", ["7", "x"])
def test_bench_bad_target_exits_2(capsys, only):
    code, _, err = run(capsys, "bench", "--only", only)
    assert code == 2 and "--only" in err


# ------------------------------------------------------------------ exit statuses and failures

FAILING = """[guest]
size = "64M"
page_order = "2M"        # a pinned page fails a punch of hugetlb memory with EAGAIN
[[steps]]
op = "accept"
[[steps]]
op = "convert"
offset = "1M"
size = "4K"
attrs = "shared"
[[steps]]
op = "pin"
offset = "1M"
[[steps]]
op = "convert"
offset = "1M"
size = "4K"
attrs = "private"
[[steps]]
op = "punch"
offset = "1M"
size = "4K"
"""


def test_exit_status_0_1_2(capsys, tmp_path):
    # 0: every operation succeeded
    code, out, err = run(capsys, "run", "boot", "--size", "64M", "--kernel", "0")
    assert code == 0 and err == "" and re.search(r"^errors +none$", out, re.M)
    # 1: operations failed; the report says which, where, and stderr says so in one line
    f = tmp_path / "fail.toml"
    f.write_text(FAILING)
    code, out, err = run(capsys, "run", f)
    assert code == 1
    assert err.splitlines() == ["gmemfast: operations failed: EAGAIN 2 (the first failure of each kind is "
                                "in the report; exit status 1)"]
    assert "failed operations (the first of each kind):" in out
    assert re.search(r"EAGAIN: convert \[0x100000, \+0x1000\) at 0x100000, first at .*fail.toml: step 4 \(convert\)",
                     out)
    assert re.search(r"EAGAIN: punch \[0x100000, \+0x1000\) at 0x100000, first at .*fail.toml: step 5 \(punch\)",
                     out)
    # the same through --json, and a recorded trace replays to the same failures
    code, out, err = run(capsys, "run", f, "--json", "--record", tmp_path / "fail.jsonl")
    assert code == 1
    s = json.loads(out)["summary"]
    assert s["errors"] == {"EAGAIN": 2} and s["expected_errors"] is None and not s["errors_as_expected"]
    assert [(x["op"], x["errno"], x["count"], x["offset"]) for x in s["failures"]] == [
        ("convert", "EAGAIN", 1, 0x100000), ("punch", "EAGAIN", 1, 0x100000)]
    code, out, err = run(capsys, "run", tmp_path / "fail.jsonl", "--json")
    assert code == 1 and json.loads(out)["summary"]["errors"] == {"EAGAIN": 2}
    # declared as expected: exit 0; expected but different: exit 1
    f.write_text(FAILING + "[expect]\nerrors = {EAGAIN = 2}\n")
    code, out, err = run(capsys, "run", f)
    assert code == 0 and err == "" and "EAGAIN 2 (as expected)" in out
    f.write_text(FAILING + "[expect]\nerrors = {EAGAIN = 1}\n")
    code, out, err = run(capsys, "run", f)
    assert code == 1 and "EAGAIN 2 (expected EAGAIN 1)" in out and "expected EAGAIN 1" in err
    # --strict stops at the first failure beyond the expected ones: exit 1, one line
    code, out, err = run(capsys, "run", f, "--strict")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and re.search(r"operation failed: .*step 5 \(punch\): punch", err)
    # 2: bad input
    code, out, err = run(capsys, "run", f, "--size", "huge")
    assert code == 2 and out == "" and len(err.splitlines()) == 1


def test_compare_exit_status_and_expected_errors(capsys, tmp_path):
    f = tmp_path / "expects.toml"
    f.write_text(FAILING + "[expect]\nerrors = {EAGAIN = 2}\n")
    code, out, err = run(capsys, "compare", f, "--vary", "direct_map=keep,on-conversion")
    assert code == 0, err
    assert re.search(r"^errors +EAGAIN 2 \(as expected\) +EAGAIN 2 \(as expected\)$", out, re.M)
    code, out, err = run(capsys, "compare", EXAMPLES / "bounce-trace.csv", "--vary", "tracking=in-place,legacy")
    assert code == 1 and "[tracking=legacy]" in err and "[tracking=in-place]" not in err


def test_help_documents_exit_statuses(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for status in (0, 1, 2):
        assert re.search(rf"^  {status} +\S", out, re.M), out
    assert "operations failed" in out and "bad input" in out


def test_broken_pipe(tmp_path):
    """Writing to a reader that went away (gmemfast ... | head -1): exit 0, nothing on stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in (["scenarios"], ["counters", "--profile", "snp"], ["run", "boot", "--size", "64M", "--json"]):
        r, w = os.pipe()
        os.close(r)                     # the reader is gone before anything is written
        try:
            p = subprocess.run([sys.executable, "-m", "gmemfast", *argv], stdout=w, stderr=subprocess.PIPE,
                               env=env, timeout=120)
        finally:
            os.close(w)
        assert p.returncode == 0, p.stderr
        assert p.stderr == b"", p.stderr


# ------------------------------------------------------------------ output that says what it means

def test_counters_command(capsys):
    from gmemfast._layout import COUNTER_NAMES
    from gmemfast.cost import COUNTER_UNITS, CostModel
    code, out, _ = run(capsys, "counters")
    assert code == 0
    for name in COUNTER_NAMES:
        assert re.search(rf"^{name} +{re.escape(COUNTER_UNITS[name])}$", out, re.M), name
    d = run_json(capsys, "counters", "--profile", "tdx")
    model = CostModel.from_profile("tdx")
    assert d["profile"] == "tdx" and [c["name"] for c in d["counters"]] == list(COUNTER_NAMES)
    for c in d["counters"]:
        assert c["ns"] == model.ns_per_unit.get(c["name"])
        assert c["source"] == model.sources().get(c["name"])
        assert c["unit"] == COUNTER_UNITS[c["name"]]
    code, out, _ = run(capsys, "counters", "--profile", "snp")
    src = CostModel.from_profile("snp").sources()["lru_drains"]
    assert f"lru_drains: 50.0 µs per lru_add_drain_all() call\n    source: {src}" in out
    # the unknown-counter error points at this command
    code, _, err = run(capsys, "run", "boot", "--set", "guest_exit=1")
    assert code == 2 and "`gmemfast counters` lists them" in err


def test_launch_prints_vcpu_and_vmm_type(capsys):
    code, out, _ = run(capsys, "launch", "snp", "--ovmf", "synthetic", "--vcpus", "2",
                       "--vcpu-type", "EPYC-Milan", "--vmm-type", "ec2")
    assert code == 0 and "vCPUs: 2   vCPU type: EPYC-Milan   VMM type: EC2" in out
    expect = snp_measure_ovmf(synthetic_ovmf(), vcpus=2, vcpu_type="EPYC-Milan", vmm_type="EC2").digest.hex()
    assert expect in out
    d = run_json(capsys, "launch", "snp", "--ovmf", "synthetic")
    assert d["vcpu_type"] == "EPYC-v4" and d["vmm_type"] == "QEMU"


def test_run_and_compare_agree_on_4k_backing_and_define_terms(capsys):
    from gmemfast.report import TERMS
    code, out, _ = run(capsys, "run", "boot", "--size", "64M", "--kernel", "0")
    assert re.search(r"^huge pages left +- \(4K backing\)$", out, re.M)
    code, cmp_out, _ = run(capsys, "compare", "boot", "--size", "64M", "--kernel", "0")
    assert re.search(r"^huge pages left +- \(4K backing\) +- \(4K backing\)$", cmp_out, re.M)
    for text in (out, cmp_out):
        assert " ".join(text.split()).count(TERMS) == 1
    assert "cost figures: built-in profile snp (gmemfast counters --profile snp" in out


def test_progress_covers_the_whole_run(tmp_path):
    f = tmp_path / "p.toml"
    count, churn = (2000, "1M") if SMALL else (20000, "8M")
    f.write_text("[guest]\nsize = '1G'\n[[steps]]\nop = 'accept'\n"
                 f"[[steps]]\nop = 'random'\ncount = {count}\nwindow = 100\nrepeat = 3\n"
                 f"[[steps]]\nop = 'churn'\noffset = 0\nsize = '{churn}'\niterations = 2\n")
    calls = []
    S.run_scenario_file(f, progress=lambda label, done, total: calls.append((label, done / total)))
    fracs = [x for _l, x in calls]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and fracs[0] < 0.3
    # 5 parts (accept, random x3, churn): each repeat and each iteration moves the bar
    labels = [l for l, _x in calls]
    for i in (1, 2, 3):
        at = [x for l, x in calls if l.startswith(f"step 2/3 random ({i}/3)")]
        assert at and i / 5 - 1e-3 <= min(at) and max(at) <= (i + 1) / 5 + 1e-3
    assert any("iteration 2/2" in l for l in labels)
    assert sum(x == 1.0 for x in fracs) <= 3       # not stuck at 100% while work goes on
