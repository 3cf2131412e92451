"""One direction of dependency, held by a test: no module imports one of a higher layer (lazy imports included).

backend, _checks, _triton_utils, _cuda_ext, shapes        shared by the ops, import nothing above them
ops/<op>/naive.py -> ops/<op>/{triton,cuda,batch}.py -> ops/<op>/op.py
modules/                                                 (nn.Module layers and the adapter pool)
training/, models/                                       (DyLoRA/AdaLoRA helpers; peft's rules and files)
the package's __init__, demo, __main__
"""

import ast
import pathlib

import lowrank_kernels

ROOT = pathlib.Path(lowrank_kernels.__file__).parent


def layer(module: str) -> float:
    """The layer of ``lowrank_kernels.<module>`` (dotted, without the package name)."""
    parts = module.split(".")
    if parts[0] in ("backend", "_checks", "_triton_utils", "_cuda_ext", "shapes", "_C"):
        return 0
    if parts[0] == "ops":
        if len(parts) < 3:
            return 1.9  # an op package's __init__ (ops/__init__ re-exports the op modules)
        return {"naive": 1.0, "triton": 1.1, "cuda": 1.1, "batch": 1.1}.get(parts[2], 1.2)
    if parts[0] == "modules":
        return 2
    if parts[0] in ("training", "models"):
        return 3
    return 4


def modules_and_imports():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        imports = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
                elif node.module and node.module.startswith("lowrank_kernels"):
                    names = [node.module.removeprefix("lowrank_kernels").lstrip(".")]
                else:
                    continue
                imports += [n for n in names if n]
            elif isinstance(node, ast.Import):
                imports += [
                    a.name.removeprefix("lowrank_kernels.") for a in node.names if a.name.startswith("lowrank_kernels.")
                ]
        yield name or "__init__", imports


def test_no_module_imports_a_higher_layer():
    checked, violations = 0, []
    for name, imports in modules_and_imports():
        for target in imports:
            checked += 1
            if layer(target) > layer(name):
                violations.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert checked > 50  # the walk found the package's imports
    assert not violations, "\n".join(violations)


def test_the_layer_map_knows_every_module():
    names = {name for name, _ in modules_and_imports()}
    assert {"backend", "ops.lora.op", "ops.lora.naive", "ops.dora.triton", "modules.lora", "models.inject"} <= names
    assert layer("ops.lora.naive") < layer("ops.lora.triton") < layer("ops.lora.op") < layer("modules.lora")
