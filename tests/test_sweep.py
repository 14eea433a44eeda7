"""Sweeps on dask.distributed: rows, determinism, failures, resume, bad grids.

Everything runs on a real ``distributed.LocalCluster`` of two worker processes (and, to
check that the default path gives the same rows, on the local cluster ``sweep`` starts
itself). Scenarios stay tiny so the file runs in seconds.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")

import gmemfast
from gmemfast import cli
from gmemfast.scenarios import ScenarioError
from gmemfast.sweep import plan_sweep, read_rows, run_sweep

ROOT = Path(__file__).resolve().parent.parent
SMALL = os.environ.get("GMEMFAST_TEST_SMALL", "") not in ("", "0") or \
    os.environ.get("NUMBA_DISABLE_JIT", "") not in ("", "0")

# tiny runs: a fraction of a second each
FIXED = {"size": "2G", "conversions": 500} if SMALL else {"size": "4G", "conversions": 2000}
FIXED_ARGS = [a for k, v in FIXED.items() for a in (f"--{k}", str(v))]
# runs long enough (a few tenths of a second each, JIT or not) for a kill to land mid-task
SLOW = {"size": "4G", "conversions": 4000} if SMALL else {"size": "64G", "conversions": 100000}
SLOW_ARGS = [a for k, v in SLOW.items() for a in (f"--{k}", str(v))]
GRID = {"seed": [0, 1], "tracking": ["in-place", "legacy"]}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as lc:
        with distributed.Client(lc) as client:
            yield lc, client


@pytest.fixture(scope="module")
def on_cluster(cluster):
    """The GRID sweep on the fixture cluster."""
    return gmemfast.sweep("fragmentation", GRID, FIXED, client=cluster[1])


def cli_run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def single_run(capsys, *argv):
    code, out, err = cli_run(capsys, "run", *argv, "--json", "--no-progress")
    assert code == 0, err
    return json.loads(out)


def assert_row_matches_run(row, d):
    """A sweep row against ``gmemfast run --json`` of the same configuration."""
    assert row["error"] is None or pd.isna(row["error"])
    assert row["scenario"] == d["scenario"]
    assert row["profile"] == d["profile"]
    for k, v in d["params"].items():
        assert row[k] == v, k
    assert row["cpu_ns"] == d.get("cpu_ns", d["total_ns"])
    if "wall_ns" in d:
        assert row["wall_ns"] == d["wall_ns"]
    for ph, v in d["phases"].items():
        assert row[f"cpu_ns:{ph}"] == v.get("cpu_ns", v["ns"]), ph
        if "wall_ns" in v:
            assert row[f"wall_ns:{ph}"] == v["wall_ns"], ph
    s = d["summary"]
    for k in ("huge_pages_left", "huge_pages_max", "direct_map_entries", "direct_map_4k_bytes",
              "attribute_ranges"):
        assert row[k] == s[k], k
    for k, v in s.items():                  # and every other figure of the final state
        if isinstance(v, (list, tuple)):
            assert json.loads(row[k]) == v, k   # lists (the first failures) as JSON text
        elif v is None:
            assert pd.isna(row[k]), k           # a missing value: NA in the frame
        elif not isinstance(v, dict):
            assert row[k] == v, k
    for size in ("1G", "2M", "4K"):
        assert row[f"dmap_{size.lower()}"] == s["direct_map"][size]
    assert row["errors"] == sum(s["errors"].values())
    assert json.loads(row["errors_by_errno"]) == s["errors"]
    for k in ("measurement", "measurement_kind"):
        if k in d["extra"]:
            assert row[k] == d["extra"][k]
    assert row["run_seconds"] > 0


def without_run_time(frame):
    return frame.drop(columns=["run_seconds"]).reset_index(drop=True)


# ---------------------------------------------------------------------------- rows

def test_one_row_per_configuration_typed(on_cluster):
    df = on_cluster
    assert len(df) == 4 and df["config_id"].is_unique
    assert sorted(zip(df["seed"], df["tracking"])) == sorted(
        (s, t) for s in GRID["seed"] for t in GRID["tracking"])
    assert str(df["seed"].dtype) == "Int64" and str(df["size"].dtype) == "Int64"
    assert df["reaccept"].dtype == "boolean" and df["cpu_ns"].dtype == "Float64"
    assert (df["size"] == (2 << 30 if SMALL else 4 << 30)).all()
    assert (df["conversions"] == FIXED["conversions"]).all()
    assert df["error"].isna().all()
    # legacy tracking runs a phase in-place tracking has not: 0 ns there, not missing
    legacy = df[df["tracking"] == "legacy"]
    inplace = df[df["tracking"] == "in-place"]
    assert (legacy["cpu_ns:set-private"] > 0).all() and (inplace["cpu_ns:set-private"] == 0).all()


def test_row_equals_single_run(capsys, on_cluster):
    for _, row in on_cluster.iterrows():
        d = single_run(capsys, "fragmentation", *FIXED_ARGS, "--seed", str(row["seed"]),
                       "--tracking", row["tracking"])
        assert_row_matches_run(row, d)


def test_launch_measurement_in_rows(capsys, cluster):
    df = gmemfast.sweep("boot", {"platform": ["snp", "tdx"]}, {"size": "256M", "kernel": "1M"},
                        client=cluster[1])
    for _, row in df.iterrows():
        d = single_run(capsys, "boot", "--size", "256M", "--kernel", "1M", "--platform", row["platform"])
        assert len(row["measurement"]) == 96
        assert_row_matches_run(row, d)
    assert df["measurement"].nunique() == 2


def test_scenario_file_and_trace(capsys, cluster):
    for target in (ROOT / "examples" / "bounce-trace.csv", ROOT / "examples" / "balloon-cycles.toml"):
        df = gmemfast.sweep(str(target), {"seed": [3, 4]}, {"size": "1G"}, client=cluster[1])
        assert len(df) == 2 and df["error"].isna().all()
        d = single_run(capsys, str(target), "--size", "1G", "--seed", "4")
        assert_row_matches_run(df[df["seed"] == 4].iloc[0], d)


def test_local_cluster_gives_the_same_rows(on_cluster):
    local = gmemfast.sweep("fragmentation", GRID, FIXED, workers=2)
    pd.testing.assert_frame_equal(without_run_time(local), without_run_time(on_cluster))


def test_failing_configuration_becomes_a_row(cluster, tmp_path):
    missing = str(tmp_path / "no-such-ovmf.fd")
    df = gmemfast.sweep("boot", {"ovmf": ["synthetic", missing]}, {"size": "256M", "kernel": "1M"},
                        client=cluster[1])
    ok, bad = df[df["ovmf"] == "synthetic"].iloc[0], df[df["ovmf"] == missing].iloc[0]
    assert pd.isna(ok["error"]) and ok["cpu_ns"] > 0
    assert missing in bad["error"] and pd.isna(bad["cpu_ns"])


def test_warm_up_runs_on_every_worker_first(cluster):
    client = cluster[1]
    with distributed.get_task_stream(client) as ts:
        gmemfast.sweep("fragmentation", {"seed": [0, 1, 2]}, FIXED, client=client)
    warm = [t for t in ts.data if "warm-up" in str(t["key"])]
    grid = [t for t in ts.data if "gmemfast-sweep" in str(t["key"])]
    assert {t["worker"] for t in warm} == set(client.nthreads())
    assert len(grid) == 3
    last_warm = max(s["stop"] for t in warm for s in t["startstops"] if s["action"] == "compute")
    first_run = min(s["start"] for t in grid for s in t["startstops"] if s["action"] == "compute")
    # the scheduler shifts each worker's times by its estimate of that worker's clock
    # offset, a few milliseconds; a warm-up still running would overlap by far more
    assert last_warm <= first_run + 0.05, (last_warm, first_run)


def test_progress_reports_done_of_total(cluster):
    calls = []
    run_sweep("fragmentation", {"seed": [0, 1, 2]}, FIXED, client=cluster[1],
              progress=lambda label, done, total: calls.append((label, done, total)))
    assert calls[-1][1:] == (3, 3)
    assert all(total == 3 and 0 <= done <= 3 for _l, done, total in calls)
    assert [d for _l, d, _t in calls] == sorted(d for _l, d, _t in calls)
    assert "left" in calls[-1][0]


# ---------------------------------------------------------------------------- bad grids

@pytest.mark.parametrize("grid, words", [
    ({"colour": ["red"]}, ["colour", "not a parameter"]),
    ({"page_order": ["18", "3"]}, ["page_order=3", "must be 0"]),
    ({"seed": []}, ["seed", "empty"]),
    ({"platform": ["snp", "sev"]}, ["platform=sev"]),
    ({"size": ["4G", "4096M"]}, ["size", "repeats"]),
    ({"granule": ["4K", "4096"]}, ["granule", "repeats"]),
    ({"size": ["4G", "3M"]}, ["size=3M", "not a multiple"]),
    ({"tracking": ["in-place", "legacy"], "flow": ["in-place"]}, ["tracking=legacy", "flow"]),
])
def test_bad_grid_is_refused_before_any_work(grid, words):
    with pytest.raises(ScenarioError) as info:
        plan_sweep("fragmentation", grid, {"conversions": 2000})
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("argv, words", [
    (["--grid", "colour=red"], ["colour"]),
    (["--grid", "page_order=18,3"], ["page_order=3"]),
    (["--grid", "seed="], ["seed", "empty"]),
    (["--grid", "seed=1,2", "--seed", "3"], ["seed", "fixed"]),
    (["--grid", "seed=1", "--grid", "seed=2"], ["seed", "twice"]),
    (["--grid", "size=4G,8G"], ["size", "fixed"]),
])
def test_bad_grid_exits_2_and_writes_nothing(capsys, tmp_path, argv, words):
    out = tmp_path / "rows.parquet"
    code, stdout, err = cli_run(capsys, "sweep", "fragmentation", *FIXED_ARGS, *argv, "--out", str(out))
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("gmemfast: error:") and "Traceback" not in err
    for w in words:
        assert w in line
    assert not list(tmp_path.iterdir())


def test_bad_outputs_exit_2(capsys, tmp_path):
    code, _, err = cli_run(capsys, "sweep", "fragmentation", "--grid", "seed=1", "--out", str(tmp_path / "x.txt"))
    assert code == 2 and ".parquet or .csv" in err
    code, _, err = cli_run(capsys, "sweep", "fragmentation", "--grid", "seed=1",
                           "--out", str(tmp_path / "nowhere" / "x.csv"))
    assert code == 2 and "does not exist" in err
    existing = tmp_path / "old.csv"
    existing.write_text("precious\n")
    code, _, err = cli_run(capsys, "sweep", "fragmentation", "--grid", "seed=1", "--out", str(existing))
    assert code == 2 and "--resume" in err and existing.read_text() == "precious\n"
    code, _, err = cli_run(capsys, "sweep", "no-such-scenario", "--grid", "seed=1", "--out",
                           str(tmp_path / "y.csv"))
    assert code == 2 and "no-such-scenario" in err
    code, _, err = cli_run(capsys, "sweep", "fragmentation", "--grid", "seed=1", "--workers", "2",
                           "--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path / "y.csv"))
    assert code == 2 and "--workers" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]


def test_without_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)     # import distributed fails
    with pytest.raises(ImportError, match=r'pip install "gmemfast\[sweep\]"'):
        gmemfast.sweep("fragmentation", {"seed": [1]}, FIXED)
    code, _, err = cli_run(capsys, "sweep", "fragmentation", "--grid", "seed=1", "--out",
                           str(tmp_path / "x.parquet"))
    assert code == 2 and 'pip install "gmemfast[sweep]"' in err
    assert not list(tmp_path.iterdir())
    # a fresh interpreter without them: the package and the command's help still load
    code = ("import sys\n"
            "for m in ('dask', 'distributed', 'pandas', 'pyarrow'): sys.modules[m] = None\n"
            "import gmemfast, gmemfast.cli\n"
            "assert callable(gmemfast.sweep)\n"
            "sys.exit(gmemfast.cli.main(['sweep', '--help']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--grid" in proc.stdout and "gmemfast[sweep]" in proc.stdout


# ---------------------------------------------------------------------------- command line

def test_cli_table_json_plot_and_file(capsys, cluster, tmp_path, on_cluster):
    out, png = tmp_path / "rows.parquet", tmp_path / "sweep.png"
    args = ["sweep", "fragmentation", *FIXED_ARGS, "--grid", "seed=0,1", "--grid", "tracking=in-place,legacy",
            "--scheduler", cluster[0].scheduler_address, "--out", str(out), "--no-progress"]
    code, text, err = cli_run(capsys, *args, "--plot", str(png))
    assert code == 0, err
    assert "4 configurations" in text and "seed=1 tracking=legacy" in text
    assert png.stat().st_size > 10_000
    saved = pd.read_parquet(out)
    pd.testing.assert_frame_equal(without_run_time(saved), without_run_time(on_cluster))
    # --json, resuming the finished file: nothing runs again
    code, text, err = cli_run(capsys, *args, "--resume", "--json")
    assert code == 0, err
    d = json.loads(text)
    assert d["command"] == "sweep" and d["configurations"] == 4 and d["resumed"] == 4 and d["failed"] == 0
    assert [r["run_seconds"] for r in d["rows"]] == list(saved["run_seconds"])
    assert d["grid"] == {"seed": ["0", "1"], "tracking": ["in-place", "legacy"]}


def test_cli_rows_sorted_by_time(capsys, cluster, tmp_path):
    n = [400, 100, 200] if SMALL else [4000, 1000, 2000]
    code, text, err = cli_run(capsys, "sweep", "fragmentation", "--size", FIXED["size"], "--grid",
                              "conversions=" + ",".join(map(str, n)), "--scheduler",
                              cluster[0].scheduler_address, "--out", str(tmp_path / "r.csv"), "--no-progress")
    assert code == 0, err
    lines = [ln for ln in text.splitlines() if ln.startswith("conversions=")]
    assert [ln.split()[0] for ln in lines] == [f"conversions={c}" for c in sorted(n)]


def test_table_sorts_by_wall_time_when_rows_have_it():
    from gmemfast.report import format_sweep

    def row(label, cpu, wall, error=None):
        return {"config": label, "cpu_ns": cpu, "wall_ns": wall, "error": error, "huge_pages_left": 1,
                "huge_pages_max": 4, "dmap_1g": 1, "dmap_2m": 2, "dmap_4k": 3, "direct_map_4k_bytes": 12288,
                "attribute_ranges": 5, "errors": 0, "run_seconds": 0.5}
    rows = [row("a", 3e9, 1e9), row("b", 1e9, 2e9), row("c", None, None, "ScenarioError: no"),
            row("d", 2e9, 0.5e9)]
    text = format_sweep(rows, ["x"])
    order = [ln.split()[0] for ln in text.splitlines() if ln[:1] in "abcd" and ln[1:2] == " "]
    assert order == ["d", "a", "b", "c"]
    assert "wall time" in text and "ScenarioError: no" in text.split("failed (1)")[1]
    rows = [dict(r, wall_ns=None) for r in rows]          # no wall time: by CPU time
    order = [ln.split()[0] for ln in format_sweep(rows, ["x"]).splitlines()
             if ln[:1] in "abcd" and ln[1:2] == " "]
    assert order == ["b", "d", "a", "c"]


# ---------------------------------------------------------------------------- reliability

def _worker_pids(client):
    return client.run(os.getpid)


def test_worker_killed_mid_sweep_loses_nothing(cluster, tmp_path):
    lc, client = cluster
    grid = {"seed": [0, 1, 2, 3, 4, 5]}
    out = tmp_path / "rows.parquet"
    result = {}
    t = threading.Thread(target=lambda: result.update(
        frame=run_sweep("fragmentation", grid, SLOW, client=client, out=str(out))))
    t.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and t.is_alive():
        busy = {w: keys for w, keys in client.processing().items()
                if any("gmemfast-sweep" in str(k) for k in keys)}
        if busy:
            victim = next(iter(busy))
        else:
            time.sleep(0.02)
    assert victim is not None, "no sweep task seen running"
    time.sleep(0.05)                                  # well inside the task
    os.kill(_worker_pids(client)[victim], signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    frame = result["frame"]
    assert len(frame) == 6 and frame["config_id"].is_unique and frame["error"].isna().all()
    # the dead worker's task ran again elsewhere: the scheduler sent it out twice
    sent = client.run_on_scheduler(lambda dask_scheduler: [
        str(t[0]) for t in dask_scheduler.transition_log
        if "gmemfast-sweep" in str(t[0]) and t[2] == "processing"])
    assert any(sent.count(k) > 1 for k in sent)
    saved = pd.read_parquet(out)
    pd.testing.assert_frame_equal(saved, frame)
    # and the rows are the ones an undisturbed run gives
    again = gmemfast.sweep("fragmentation", {"seed": [3]}, SLOW, client=client)
    pd.testing.assert_frame_equal(without_run_time(again), without_run_time(frame[frame["seed"] == 3]))
    client.wait_for_workers(2, timeout=60)


def test_resume_after_the_sweep_is_killed(capsys, cluster, tmp_path):
    lc, client = cluster
    out = tmp_path / "rows.csv"
    args = ["sweep", "fragmentation", *SLOW_ARGS, "--grid", "seed=0,1,2,3,4,5",
            "--scheduler", lc.scheduler_address, "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "gmemfast", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    before = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists():
            before = read_rows(out)
            if len(before) >= 2:
                break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert 2 <= len(before) < 6, proc.stderr.read().decode()
    # what the killed sweep left: a readable file of complete rows
    left = read_rows(out)
    assert len(left) >= len(before)
    assert all(r["error"] is None and r["cpu_ns"] > 0 for r in left)
    code, text, err = cli_run(capsys, *args[:-1], "--resume", "--json", "--no-progress")
    assert code == 0, err
    d = json.loads(text)
    assert d["resumed"] == len(left) and d["configurations"] == 6
    ids = [r["config_id"] for r in d["rows"]]
    assert len(set(ids)) == 6 and sorted(r["seed"] for r in d["rows"]) == list(range(6))
    by_id = {r["config_id"]: r for r in d["rows"]}
    for r in left:                   # kept as they were, not run again
        assert by_id[r["config_id"]]["run_seconds"] == r["run_seconds"]
        assert by_id[r["config_id"]]["cpu_ns"] == r["cpu_ns"]
    final = read_rows(out)
    assert sorted(r["config_id"] for r in final) == sorted(ids)
    # the CSV file reads back with its types
    assert all(isinstance(r["seed"], int) and isinstance(r["cpu_ns"], float) for r in final)


def test_sweep_options_win_over_a_scenario_parameter_of_the_same_name():
    import argparse
    from gmemfast.sweep import add_arguments
    p = argparse.ArgumentParser()
    p.add_argument("--workers", dest="sp_workers")          # as a scenario parameter's option
    add_arguments(p)
    args = p.parse_args(["fragmentation", "--grid", "seed=1", "--out", "x.csv", "--workers", "3"])
    assert args.workers == 3 and "sp_workers" not in vars(args)
    with pytest.raises(argparse.ArgumentError):       # later options conflict as usual
        p.add_argument("--grid")
