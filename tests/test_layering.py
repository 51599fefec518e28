"""The package's layering, from the code's own imports (grimp, import-linter's graph library).

- the import-linter contracts of pyproject.toml (``[tool.importlinter]``): the core never imports
  a tool; the core's layers (calibrate > plan > runtime > parallel > processors > methods/models/
  ulysses > kernels); a kernel never knows a method exists, a method never inspects a model; no
  cycles between the modules of a package;
- no import cycle between any two modules of ``ditaccel`` (function-local imports included:
  grimp reads every import statement, so a cycle cannot hide inside a function);
- the package root (the public API) reaches no tool;

and each check shown to fail on a graph with one forbidden import added.
"""

from copy import deepcopy
from pathlib import Path

import grimp
import pytest
from importlinter.application.use_cases import _get_built_in_contract_types, read_user_options
from importlinter.configuration import configure

configure()  # what the lint-imports command does first: the config readers, the graph builder

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

#: tool modules and packages: everything the core must never import
TOOLS = ("ditaccel.__main__", "ditaccel.cli", "ditaccel.cli_support", "ditaccel.bench", "ditaccel.evaluate",
         "ditaccel.quality", "ditaccel.worth", "ditaccel.baselines", "ditaccel.viz", "ditaccel.testbed")


def graph() -> grimp.ImportGraph:
    return grimp.build_graph("ditaccel", cache_dir=None)


def broken_contracts(g: grimp.ImportGraph) -> list[str]:
    """Names of the pyproject.toml contracts that ``g`` breaks."""
    options = read_user_options(str(PYPROJECT))
    kinds = dict(_get_built_in_contract_types())
    assert options.contracts_options, "no [[tool.importlinter.contracts]] in pyproject.toml"
    broken = []
    for contract_options in options.contracts_options:
        contract = kinds[contract_options["type"]](name=contract_options["name"],
                                                   session_options=options.session_options,
                                                   contract_options=contract_options)
        if not contract.check(deepcopy(g), verbose=False).kept:  # a copy: contracts may change the graph
            broken.append(contract.name)
    return broken


def module_cycle(g: grimp.ImportGraph) -> list[str] | None:
    """One import cycle between modules of ``g`` (each module on its own, not squashed), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(g.find_modules_directly_imported_by(m)):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g.modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def tools_reached_from_root(g: grimp.ImportGraph) -> set[str]:
    upstream = g.find_upstream_modules("ditaccel", as_package=False)
    return {m for m in upstream if m.startswith(TOOLS)}


def test_the_contracts_hold():
    assert broken_contracts(graph()) == []


def test_no_import_cycles_between_modules():
    assert module_cycle(graph()) is None


def test_the_public_api_reaches_no_tool():
    assert tools_reached_from_root(graph()) == set()


@pytest.mark.parametrize("importer, imported, contract", [
    ("ditaccel.runtime", "ditaccel.bench.harness", "The core never imports a tool"),
    ("ditaccel.kernels.tiles", "ditaccel.methods.adaspa", "A kernel never imports a method"),
    ("ditaccel.methods.adaspa", "ditaccel.models.adapters", "a method never inspects a model"),
    ("ditaccel.processors", "ditaccel.runtime", "The core's layers"),
    ("ditaccel.kernels.window_mask", "ditaccel.kernels.window", "No cycles between the modules of a package"),
])
def test_the_contracts_bite(importer, imported, contract):
    g = graph()
    g.add_import(importer=importer, imported=imported)
    assert any(contract in name for name in broken_contracts(g))


def test_the_cycle_and_root_checks_bite():
    g = graph()
    g.add_import(importer="ditaccel.bench.harness", imported="ditaccel.cli")  # cli -> bench -> ... -> harness
    assert module_cycle(g) is not None
    g = graph()
    g.add_import(importer="ditaccel.plan", imported="ditaccel.viz")
    assert tools_reached_from_root(g) == {"ditaccel.viz"}
