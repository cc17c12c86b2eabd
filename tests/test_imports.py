"""The package's imports run one way: no module imports, at any depth or inside a function, a module
that imports it back; kernels/ imports nothing of layers/ or autotune/; the config model imports
nothing of layers/; and `import persistrnn` neither compiles kernels nor loads triton's compiler."""
import ast
import pathlib
import subprocess
import sys

import persistrnn

ROOT = pathlib.Path(persistrnn.__file__).resolve().parent
PACKAGE = "persistrnn"
SKIPPED = {"tests", "build", "dist"}


def package_modules(root=ROOT):
    """{module name: path} of every Python file of the package (tests excluded)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in SKIPPED or any(p.endswith(".egg-info") for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = path
    return modules


def _resolve(module, is_package, node):
    """The absolute name an ImportFrom's module refers to, from inside `module`."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module, path, modules):
    """The package modules that `module` imports anywhere in its source (top level, functions,
    try blocks), each with the line it is imported on."""
    is_package = path.name == "__init__.py"
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            # `from package import name`: name is a submodule, or a name defined in the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # `import persistrnn.x.y as z`, names inside modules
                target = target.rpartition(".")[0]
            if target and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root=ROOT):
    modules = package_modules(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def circles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


# (importer prefix, imported prefix): imports that would run the wrong way
FORBIDDEN = [
    ("persistrnn.kernels", "persistrnn.layers"),
    ("persistrnn.kernels", "persistrnn.autotune"),
    ("persistrnn.kernels", "persistrnn.benchmarks"),
    ("persistrnn.configs", "persistrnn.layers"),
    ("persistrnn.configs", "persistrnn.autotune"),
    ("persistrnn.layers", "persistrnn.benchmarks"),
]


def wrong_way(graph):
    """'a -> b (line n)' for every import of FORBIDDEN."""
    def under(module, prefix):
        return module == prefix or module.startswith(prefix + ".")
    return [f"{a} -> {b} (line {line})" for a, targets in graph.items() for b, line in targets.items()
            for low, high in FORBIDDEN if under(a, low) and under(b, high)]


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    edges = [f"{a} -> {b} (line {line})" for circle in found for a in circle for b, line in graph[a].items()
             if b in circle]
    assert found == [], "imports in a circle:\n" + "\n".join(edges)


def test_imports_run_one_way():
    assert wrong_way(import_graph()) == []


def test_walker_sees_function_level_imports_and_circles(tmp_path):
    """The walker itself: an import inside a function closes a circle, and a kernel importing a layer
    is caught (a tree shaped like the package, in a temporary folder)."""
    for folder in ("kernels", "layers"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "kernels" / "skeleton.py").write_text("def f():\n    from ..layers import rnn\n")
    (tmp_path / "layers" / "rnn.py").write_text("from ..kernels.skeleton import f\n")
    graph = import_graph(tmp_path)
    assert graph["persistrnn.kernels.skeleton"] == {"persistrnn.layers.rnn": 2}
    assert circles(graph) == [["persistrnn.kernels.skeleton", "persistrnn.layers.rnn"]]
    assert wrong_way(graph) == ["persistrnn.kernels.skeleton -> persistrnn.layers.rnn (line 2)"]


def test_import_loads_no_compiler():
    """`import persistrnn` (and making a layer) loads none of the tools that compile kernels ahead of
    time or search configs: they come with the tools (tune, inspect, capacity) that need them."""
    code = ("import sys, persistrnn; persistrnn.LSTM(4, 8); "
            "print(sorted(m for m in sys.modules if m.startswith(('persistrnn.autotune.aot', "
            "'persistrnn.autotune.capacity', 'persistrnn.autotune.space', 'persistrnn.autotune.tune', "
            "'persistrnn.autotune.inspect', 'persistrnn.benchmarks'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
