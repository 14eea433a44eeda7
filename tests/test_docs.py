"""Every ``gmemfast`` command shown in README.md and examples/README.md runs as written.

The commands are read from the documents' code blocks (fenced or indented), one test
each, and run with exactly the arguments shown through the command's entry point
(``gmemfast.cli.main``; tests/test_cli.py runs the installed command itself), in a
fresh folder holding a copy of ``examples/`` (the commands name files relative to the
repository). A command that replays a file an earlier command records runs after that
one. Each must exit 0 (``bench``: 0, or 1 for a missed speed target, which a shared
machine may cause) and print its result. The other lines of those blocks (``pip``,
``pytest``, ``asv``) install and check the project, and are not run.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import SMALL
from gmemfast import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "examples" / "README.md")
OUTPUT_OPTIONS = ("--record", "--plot", "--out", "-o")


def code_lines(text: str):
    """The lines of a Markdown text's code blocks: fenced (```) or indented by 4 spaces."""
    fenced = False
    prev_blank = True
    in_indented = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield line
            continue
        if line.startswith("    ") and (prev_blank or in_indented):
            in_indented = True
            yield line
        elif line.strip():
            in_indented = False
        prev_blank = not line.strip()


def documented_commands() -> list[tuple[str, list[str]]]:
    """(document, argv) of every gmemfast command in the documents' code blocks, in order
    (a command shown twice is run once)."""
    out = []
    for doc in DOCS:
        lines, pending = [], ""
        for line in code_lines(doc.read_text()):      # join continued lines (a trailing \)
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
        for line in lines:
            if "tcp://HOST" in line:                   # needs a cluster at a placeholder address
                continue
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv[:1] == ["gmemfast"] and argv not in [a for _d, a in out]:
                    out.append((doc.relative_to(ROOT).as_posix(), argv))
    return out


COMMANDS = documented_commands()


def test_the_documents_show_commands():
    shown = {" ".join(argv[:2]) for _doc, argv in COMMANDS}
    assert {"gmemfast run", "gmemfast compare", "gmemfast launch", "gmemfast scenarios",
            "gmemfast counters", "gmemfast bench"} <= shown
    assert ["gmemfast", "bench", "--quick"] in [argv for _d, argv in COMMANDS]


def _outputs(argv) -> set[str]:
    return {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_OPTIONS}


def _needs(argv) -> list[list[str]]:
    """Earlier documented commands that record a file this one reads."""
    inputs = {a for a in argv[2:] if a not in _outputs(argv) and re.search(r"\.(jsonl|csv|toml)$", a)}
    makers = [other for _d, other in COMMANDS
              if inputs & _outputs(other) and other != argv and _recording(other) is None]
    return makers[:1]


def _recording(argv) -> str | None:
    """The file an ``import`` command reads when only a real host can make it (the
    documents show the recording command just before), else None."""
    if argv[1] != "import" or len(argv) < 4:
        return None
    path = argv[3]
    made_here = any(path in _outputs(other) for _d, other in COMMANDS)
    return None if made_here or (ROOT / path).exists() else path


@pytest.mark.slow
@pytest.mark.skipif(SMALL, reason="the documented commands at their documented sizes need the compiled "
                                  "kernels; the default (compiled) run of the suite runs them")
@pytest.mark.parametrize("doc,argv", COMMANDS, ids=[f"{d}: {' '.join(a[1:])}" for d, a in COMMANDS])
def test_documented_command_runs(tmp_path, monkeypatch, capsys, doc, argv):
    for a in argv:
        if a.startswith("/") and not os.path.exists(a):
            pytest.skip(f"{a} is not on this machine (the command needs that file)")
    recording = _recording(argv)
    if recording:
        pytest.skip(f"{recording} is a recording made on a real host (the command before it in {doc})")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GMEMFAST_OVMF", raising=False)
    for step in [*_needs(argv), argv]:
        code = cli.main(step[1:])
        out, err = capsys.readouterr()
        allowed = (0, 1) if step[1] == "bench" else (0,)
        assert code in allowed, f"{' '.join(step)} (in {doc}) exited {code}:\n{err}"
        assert out.strip(), f"{' '.join(step)} printed nothing:\n{err}"
        for path in _outputs(step):
            assert (tmp_path / path).exists(), path


SECTION_REF = re.compile(r"model\.md\s*§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*) ", re.M)


def section_references():
    """(file, section) of every ``docs/model.md §N`` citation in the project's text files."""
    refs = []
    for sub in ("gmemfast", "tests", "benchmarks", "docs", "examples"):
        for path in sorted((ROOT / sub).rglob("*")):
            if path.suffix in (".py", ".md", ".toml", ".txt") and "__pycache__" not in path.parts:
                refs += [(path.relative_to(ROOT).as_posix(), m) for m in SECTION_REF.findall(path.read_text())]
    refs += [("README.md", m) for m in SECTION_REF.findall((ROOT / "README.md").read_text())]
    return refs


def test_cited_sections_of_the_model_exist():
    """Code and documents cite the behaviour reference by section number; renumbering a
    section must not leave a citation pointing at nothing."""
    sections = set(HEADING.findall((ROOT / "docs" / "model.md").read_text()))
    refs = section_references()
    assert len(refs) > 50, "the project cites docs/model.md by section throughout"
    missing = sorted({f"{f}: §{s}" for f, s in refs if s not in sections})
    assert not missing, f"citations of sections docs/model.md does not have: {missing}"
