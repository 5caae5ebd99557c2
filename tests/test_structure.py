"""The package's shape: no import cycles, imports only go down the layers, and the adapter
library imports and runs without the DDPM program's dependencies (or triton)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tenvoo_fast

PACKAGE = Path(tenvoo_fast.__file__).resolve().parent

#: Each part of the package and its layer: a module may import only from parts of a lower
#: layer, or from its own part.
LAYERS = {
    "errors": 0, "_version": 0, "_build_flags": 0, "files": 0.5,
    "contraction": 1,
    "triton_kernels": 2,
    "kernels": 3,
    "ops": 4,
    "dispatch": 5,
    "functional": 6,
    "nn": 7,
    "methods": 8,
    "model": 9, "measure": 9,
    "convert": 9.5,
    "ddpm": 10,
    "__init__": 11, "__main__": 11,
}

#: What ``import tenvoo_fast`` and the adapter library must run without.
OPTIONAL = ("monai", "nibabel", "matplotlib", "tqdm", "einops", "scipy", "triton", "peft",
            "lycoris", "flwr", "ray")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (triton_kernels/ is installed inside it)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                rel = (Path(folder) / f).relative_to(PACKAGE).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"] if rel.name == "__init__" \
                    else list(rel.parts)
                found[".".join(["tenvoo_fast", *parts])] = Path(folder) / f
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth of the file (function-level
    imports included: a lazy import is still a dependency)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40 and graph["tenvoo_fast.functional"], "the walk found the modules"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_only_go_down_the_layers():
    graph = import_graph()
    assert set(map(_part, graph)) <= set(LAYERS), "every part of the package has a layer"
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
              if _part(t) != _part(m) and LAYERS[_part(t)] >= LAYERS[_part(m)]]
    assert upward == []


#: Makes the optional packages unimportable, as if not installed (``import`` raises
#: ImportError, ``importlib.util.find_spec`` answers None).
BLOCKER = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
"""

LIBRARY_ONLY = BLOCKER + """
import os, tempfile
import torch
from torch import nn
import tenvoo_fast as tf

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
    def forward(self, x):
        return self.proj(self.conv(x).mean((2, 3, 4)))

torch.manual_seed(0)
model = tf.inject(Net(), tf.AdapterConfig("tenvoo-l", 2, [r"^conv$", r"^proj$"]))
with torch.no_grad():
    for p in tf.adapter_layers(model)["conv"].cores:
        p.add_(0.01)
x = torch.randn(2, 4, 4, 4, 4)
model(x).square().sum().backward()
y = model(x)
path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
tf.save_adapter(model, path)
torch.manual_seed(0)
fresh = tf.load_adapter(Net(), path)
assert torch.equal(fresh(x), y)
conv = tf.LoRAConv3d.from_conv(nn.Conv3d(4, 4, 3), 2)
conv(torch.randn(1, 4, 3, 3, 3)).sum().backward()
assert "triton" not in tf.available_backends()
loaded = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None} & set(%r))
assert not loaded, loaded
print("library ok", tf.available_backends())
""" % (OPTIONAL,)


def _run(code: str, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_library_runs_without_the_ddpm_dependencies_or_triton():
    """``import tenvoo_fast``, layers, inject, save_adapter / load_adapter, with monai, nibabel,
    matplotlib, tqdm, einops, scipy, triton and the peers all unimportable."""
    result = _run(LIBRARY_ONLY)
    assert result.returncode == 0, result.stderr
    assert "library ok" in result.stdout


@pytest.mark.parametrize("command, first, extra", [
    ("finetune", "monai", "ddpm"), ("profile", "monai", "ddpm"), ("sample", "monai", "ddpm"),
    ("evaluate", "monai", "ddpm"), ("check-kernels", "triton", "triton")])
def test_commands_name_the_extra_to_install(command, first, extra, tmp_path):
    args = {"evaluate": ["--generated", str(tmp_path), "--reference", str(tmp_path)]}
    code = BLOCKER + (f"from tenvoo_fast.ddpm.cli import main\n"
                      f"sys.exit(main([{command!r}, *sys.argv[1:]]))")
    result = _run(code, *args.get(command, []))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: tenvoo-fast {command} needs {first}")
    assert f"pip install 'tenvoo_fast[{extra}]'" in lines[0]
