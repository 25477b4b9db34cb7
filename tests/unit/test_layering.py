"""The layers' import rules, read from the source (every import statement, including those inside
functions): imports point down, the instances do not reach up into the cluster, the router knows
the instances only through the protocol module, and nothing in the library imports deploy/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "cluster", "prefill", "decode", "transfer", "placement", "deploy")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module the file imports by absolute name (``from x import y`` counts as ``x``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """'file: module' for each import of a forbidden module or of anything below it."""
    return sorted(f"{p.relative_to(ROOT)}: {name}" for p in paths for name in _imports(p)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def _tandem(*packages: str) -> tuple[str, ...]:
    return tuple(f"tandem.{p}" for p in packages)


def test_project_modules_are_imported_through_the_tandem_namespace():
    everything = [ROOT / "__init__.py", *_modules(*PACKAGES, "tests", "benchmarks")]
    assert _violations(everything, PACKAGES) == []  # `import engine` would load a second copy


@pytest.mark.parametrize("folders, forbidden", [
    (("engine",), ("ray", *_tandem("cluster", "deploy", "prefill", "decode", "transfer", "placement"))),
    (("placement",), ("ray", "torch", *_tandem("engine", "cluster", "deploy", "prefill", "decode",
                                               "transfer"))),
    (("transfer",), _tandem("cluster", "deploy", "prefill", "decode")),
    (("prefill", "decode"), _tandem("cluster", "deploy")),
    (("cluster",), _tandem("deploy")),
], ids=["engine", "placement", "transfer", "instances", "cluster"])
def test_imports_point_down(folders, forbidden):
    assert _violations(_modules(*folders), forbidden) == []


def test_the_router_imports_no_instance_module():
    assert _violations([ROOT / "cluster" / "router.py"], _tandem("prefill", "decode")) == []


@pytest.mark.parametrize("module", ["prefill/instance.py", "decode/instance.py", "transfer/protocol.py",
                                    "transfer/hosting.py", "transfer/base.py", "engine/handover.py"])
def test_instance_logic_and_the_protocol_import_no_ray(module):
    assert _violations([ROOT / module], ("ray",)) == []


def test_each_prefill_and_decode_module_imports_the_engine_only_through_its_public_api():
    """The instances may import the engine's types and the hand-over protocol, not its internals."""
    internals = _tandem("engine.scheduler", "engine.block_manager", "engine.runner", "engine.sequence",
                        "engine.model", "engine.attention")
    assert _violations(_modules("prefill", "decode"), internals) == []
