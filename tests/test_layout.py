"""The repository's layout: the library imports from a plain checkout, and its modules form no import cycle."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HUB_FILES = sorted(path.stem for path in REPO.glob("*_navil.py"))


def project_modules():
    """{module name: path} for the package `navil_hf` and the Hub files."""
    modules = {name: REPO / f"{name}.py" for name in HUB_FILES}
    for path in sorted((REPO / "navil_hf").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name, path, modules):
    """The project modules that `name` imports anywhere in its body (functions included: a cycle through a
    deferred import is still a cycle in the design)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_among_the_project_modules():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert "navil_hf.conversion.push" in graph and "navil_hf.errors" in graph["navil_hf.conversion.push"]
    assert import_cycles(graph) == []


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_imports_from_a_plain_checkout(tmp_path):
    """No install: only the checkout on `sys.path` (`-S`: no site-packages, so no editable install either)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import navil_hf.conversion, navil_hf.errors, navil_hf.folders, navil_hf.cli; "
        "print(navil_hf.conversion.__file__); print(navil_hf.errors.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(REPO)], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        str(REPO / "navil_hf" / "conversion" / "__init__.py"),
        str(REPO / "navil_hf" / "errors.py"),
    ]


def test_conversion_scripts_run_from_a_plain_checkout(tmp_path):
    """The top-level `conversion/` scripts are the `navil` subcommands they name."""
    for script, command in (
        ("convert_original_to_hf.py", "navil convert"),
        ("convert_hf_to_original.py", "navil to-original"),
        ("init_from_llm.py", "navil init-from-llm"),
        ("push_to_hub.py", "navil push"),
    ):
        out = subprocess.run(
            [sys.executable, str(REPO / "conversion" / script), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"usage: {command} "), out.stdout[:200]
