"""The package's shape, read from its source: no import cycle (module-level or inside functions), inference and
interop independent of training, one reader of the backend, and the routed-expert math free of the model."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dsv3_jax")


def _modules() -> dict[str, str]:
    """dotted module name -> path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Package modules `name` imports anywhere in its file (module level and inside functions). An import of
    `pkg.sub` counts as an import of that module only, not of the packages above it."""
    tree = ast.parse(open(MODULES[name]).read())
    is_pkg = MODULES[name].endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES:
                    out.add(full)
                elif base in MODULES:
                    out.add(base)
    out.discard(name)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_is_read():  # the checks below would pass vacuously on an empty graph
    assert "dsv3_jax.experts" in GRAPH["dsv3_jax.moe"] or "dsv3_jax.strategies" in GRAPH["dsv3_jax.moe"]
    assert "dsv3_jax.train.step" in GRAPH["dsv3_jax.train.loop"]
    assert "dsv3_jax.fp8.linear" in GRAPH["dsv3_jax.experts"]


def test_no_import_cycle():
    assert _cycles() == []


@pytest.mark.parametrize("package", ["dsv3_jax.infer", "dsv3_jax.interop"])
def test_inference_and_interop_do_not_import_training(package):
    bad = {m: sorted(i for i in deps if i == "dsv3_jax.train" or i.startswith("dsv3_jax.train."))
           for m, deps in GRAPH.items() if m == package or m.startswith(package + ".")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_backend_is_read_in_one_place():
    readers = sorted(m for m, path in MODULES.items() if "default_backend" in open(path).read())
    assert readers == ["dsv3_jax.runtime"]


def test_expert_math_imports_nothing_of_the_model():
    model_side = {"dsv3_jax.model", "dsv3_jax.moe", "dsv3_jax.mla", "dsv3_jax.config", "dsv3_jax.layers",
                  "dsv3_jax.sharding", "dsv3_jax.strategies"}
    assert GRAPH["dsv3_jax.experts"] & model_side == set()
    ep = GRAPH["dsv3_jax.parallel.expert"]
    assert "dsv3_jax.experts" in ep and "dsv3_jax.moe" not in ep
