"""The house: packages in layers with no import cycle, a small harness package, a docstring for every
package and module, and no tracked text that narrates its own history."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "methods", "datasets", "reports")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere (top level or inside a function)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {m: imports(p, m, set(mods)) for m, p in mods.items()}
    # every cycle shows up as a back edge of a depth-first search
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_layers_import_one_way():
    """bench (harness) -> methods -> bench.protocol -> datasets; reports reads results only. The leaf
    modules bench.errors, bench.progress and bench.registry import nothing of the project's and may
    be imported by every package."""
    mods = modules()
    leaves = {"bench", "bench.errors", "bench.progress", "bench.registry"}
    for m, p in mods.items():
        deps = imports(p, m, set(mods)) - leaves
        if m in leaves:
            assert deps == set(), m
        elif m.startswith("bench.protocol"):
            assert all(d.startswith(("bench.protocol", "datasets")) for d in deps), (m, deps)
        elif m.startswith("datasets"):
            assert all(d.startswith("datasets") for d in deps), (m, deps)
        elif m.startswith("methods"):
            assert all(d.startswith(("methods", "bench.protocol", "datasets")) for d in deps), (m, deps)
        elif m.startswith("reports"):
            assert all(d.startswith("reports") for d in deps), (m, deps)


def test_the_harness_package_is_small_and_every_module_says_what_it_is():
    top = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    assert len(top) <= 12, top
    for m, p in modules().items():
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc, f"{p.relative_to(ROOT)} has no docstring"
        if p.name == "__init__.py" and m != "bench":
            assert re.search(r"\bimport", doc), f"{p.relative_to(ROOT)}: say what the package may import"


HISTORY = re.compile(r"\b(session|round)\s+\d+|\bsessions?\s+\d|\bearlier we\b|\b(19|20)\d\d-\d\d-\d\d\b", re.I)


def test_no_tracked_text_narrates_its_own_history():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    hits = []
    for f in files:
        if not f.endswith((".py", ".md", ".ini", ".toml", ".txt", ".json")) or f.startswith("tests/benchmarks/baselines/"):
            continue
        if f == "tests/test_layout.py" or not (ROOT / f).is_file():
            continue
        for i, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:100]}")
    assert hits == []
