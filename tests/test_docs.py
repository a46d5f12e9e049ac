"""The README and docs say what the code does: their commands run as written.

A page is read by newcomers who copy its commands, so a renamed option, a moved module or a
benchmark flag that no longer exists is a bug in the docs. Every `python -m breakhis_tl`
command in a code block is parsed by the real parser; the cheap ones (`index`, `split`) run
on the test data in a scratch folder, in page order, so a split file written by one command is
read by the next. History belongs in git, so pages hold no commit hashes.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import SHARED, _shared

from breakhis_tl.cli import build_parser, main
from breakhis_tl.models.backbones import parse_archs

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OUTPUT_FOLDERS = ("summary_writers", "validation_graphs", "trained_models", "data")
FOLDER_READMES = [REPO / d / "README.md" for d in OUTPUT_FOLDERS]
RUNNERS = ("python", "bash")
RUN = ("index", "split")  # seconds on the test data; everything else is parsed only
# a hash in prose (`ae36189`, "commit 1e6a163"), not part of a file name (resnet50-11ad3fa6.pth)
HASH = re.compile(r"(?<![\w.-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w.-])")


INLINE = re.compile(r"`((?:python|bash|torchrun) [^`]+)`")


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of fenced and indented code, `\\` continuations joined, and of
    inline code that starts like a command (`python ...`, in prose and tables)."""
    out, fenced, held, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            out += [(n, m) for m in INLINE.findall(line)]
            continue
        if not held:
            start = n
        held += line.strip()
        if held.endswith("\\"):
            held = held[:-1] + " "
            continue
        out.append((start, held))
        held = ""
    return out


def segments(line: str) -> list[list[str]]:
    """The shell words of each `&&`-joined command on a line, comments dropped."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # Python or prose in a code block, not a shell line
        return []
    out, cur = [], []
    for w in words:
        if w in ("&&", ";", "|"):
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    return [s for s in [*out, cur] if s]


def commands(kind: str) -> list[tuple[str, list[str], list[str]]]:
    """(page:line, the words after the command, the words before it on the line) of each
    command of `kind`: `cli` (`-m breakhis_tl`), `python-c`, `benchmark` or `papermill`."""
    found = []
    for page in PAGES:
        for n, line in code_lines(page.read_text()):
            where = f"{page.relative_to(REPO)}:{n}"
            prior: list[str] = []  # earlier commands on the line (`cd notebooks && ...`)
            for words in segments(line):
                hit = _match(kind, words)
                if hit is not None:
                    found.append((where, words[hit:], prior + words[:hit]))
                prior += words
    return found


def _match(kind: str, words: list[str]) -> int | None:
    for i, w in enumerate(words[:-1]):  # a command with nothing after it is prose
        if kind == "cli" and w == "breakhis_tl" and i and words[i - 1] == "-m":
            return i + 1
        if kind == "python-c" and w == "-c" and i and words[i - 1] == "python":
            return i + 1
        if kind == "benchmark" and w.startswith("benchmarks/") and words[i - 1] in RUNNERS:
            return i
        if kind == "papermill" and w == "papermill":
            return i + 1
    return None


CLI = commands("cli")


def _ids(items) -> list[str]:
    return [f"{where}:{' '.join(argv[:1])}" for where, argv, _ in items]


def test_pages_were_found():
    assert len(PAGES) >= 8 and len(CLI) >= 20


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES + FOLDER_READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_commit_hashes(page):
    found = HASH.findall(page.read_text())
    assert not found, f"{page.name} names commits {found}: history lives in git"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES + FOLDER_READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(dest), f"{page.name} links to {target}: no such heading"


@pytest.mark.parametrize(("where", "argv", "before"), CLI, ids=_ids(CLI))
def test_command_parses(where, argv, before):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and {"-h", "--help"} & set(argv):
            return
        pytest.fail(f"{where}: `python -m breakhis_tl {' '.join(argv)}` does not parse")
    assert args.command, where
    if getattr(args, "archs", None):
        parse_archs(args.archs)  # unknown names raise UserError


def _as_run(argv: list[str], shared: Path) -> list[str]:
    """The command with `../shared/data` at the test data; any other `--data` is a
    placeholder for the BreakHis sample."""
    out = [str(shared) + w[len("../shared/data") :] if w.startswith("../shared/data") else w
           for w in argv]  # fmt: skip
    for i, w in enumerate(out[:-1]):
        if w == "--data" and not out[i + 1].startswith(str(shared)):
            out[i + 1] = str(shared / "breakhis_sample")
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One working folder for every page: pixel hashes are computed once."""
    return tmp_path_factory.mktemp("docs")


CHEAP: dict[str, list[tuple[str, list[str]]]] = {}
for _where, _argv, _ in CLI:
    if _argv and _argv[0] in RUN:
        CHEAP.setdefault(_where.rsplit(":", 1)[0], []).append((_where, _argv))


@pytest.mark.parametrize("page", sorted(CHEAP))
def test_cheap_commands_run(page, scratch, monkeypatch, capsys):
    for sub in ("breakhis_sample", "idc_sample", "breakhis_real", "Folds.csv"):
        _shared(sub)
    monkeypatch.chdir(scratch)
    for where, argv in CHEAP[page]:
        assert main(_as_run(argv, SHARED.resolve())) == 0, where
        capsys.readouterr()


PYTHON_C = commands("python-c")


@pytest.mark.parametrize(("where", "argv", "before"), PYTHON_C, ids=_ids(PYTHON_C))
def test_python_snippets_import(where, argv, before):
    for module, names in re.findall(r"from (breakhis_tl[\w.]*) import ([\w, ]+)", argv[0]):
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name), f"{where}: {module} has no {name}"


BENCH = commands("benchmark")


@pytest.mark.parametrize(("where", "argv", "before"), BENCH, ids=_ids(BENCH))
def test_benchmark_commands_exist(where, argv, before):
    script = REPO / argv[0]
    assert script.is_file(), f"{where}: {argv[0]} does not exist"
    source = script.read_text() + (REPO / "benchmarks" / "common.py").read_text()
    for opt in (w for w in argv[1:] if w.startswith("--")):
        assert f'"{opt}"' in source or f"{opt})" in source, f"{where}: {argv[0]} has no {opt}"


PAPERMILL = commands("papermill")


def _parameters(notebook: Path) -> set[str]:
    for cell in json.loads(notebook.read_text())["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return set(re.findall(r"^(\w+)\s*=", "".join(cell["source"]), re.M))
    return set()


@pytest.mark.parametrize(("where", "argv", "before"), PAPERMILL, ids=_ids(PAPERMILL))
def test_papermill_parameters_exist(where, argv, before):
    folder = REPO / (before[before.index("cd") + 1] if "cd" in before else "")
    notebook = folder / argv[0]
    assert notebook.is_file(), f"{where}: {argv[0]} not found"
    known, given = _parameters(notebook), []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-p":
            given.append(value)
        elif flag == "-y":
            given += re.findall(r"^(\w+):", value, re.M)
    assert set(given) <= known, f"{where}: {notebook.name} has no {set(given) - known}"


def _layout() -> list[str]:
    """Paths in the README's Layout block, from each line's first word and its indent."""
    text = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    block = text.split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    paths = []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        stack = [(i, n) for i, n in stack if i < indent]
        paths.append("".join(n for _, n in stack) + name)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def test_layout_matches_the_package():
    listed = _layout()
    assert [p for p in listed if not (REPO / p).exists()] == [], "README lists missing files"
    modules = {
        str(p.relative_to(REPO))
        for p in (REPO / "breakhis_tl").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    missing = sorted(modules - set(listed))
    assert not missing, f"README's Layout does not list {missing}"
