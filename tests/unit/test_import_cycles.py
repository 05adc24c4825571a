"""No import cycle inside a package: the layer contracts in .importlinter do not see a circle
between modules of one layer, so this test walks the import graph itself (grimp, which
import-linter is built on). Imports under TYPE_CHECKING and inside functions count."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")

#: Packages that must be free of cycles.
ACYCLIC = ("edge_bundle", "model_packager", "edge_agent", "fleet_controller")


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_cycle(package: str) -> None:
    graph = grimp.build_graph(package, include_external_packages=False)
    found = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                found.append(" -> ".join((module, *chain)))
    assert not found, f"import cycles in {package}:\n" + "\n".join(found[:10])
