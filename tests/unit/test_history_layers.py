"""History's layers: only its Redis adapters, and the server that creates their clients, use redis-py."""

from __future__ import annotations

import ast
from pathlib import Path

import history_svc

# The read models' adapters (one node's, with its shared connection, and a Redis Cluster's), the
# change stream's adapter, and the server, which creates the clients and hands them to the adapters.
REDIS_MODULES = {"queries", "multiplex", "clusterqueries", "changestream", "server"}
REDIS_PACKAGES = {"redis", "hiredis"}


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever the import stands (also under TYPE_CHECKING)."""
    packages: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            packages.add(node.module.split(".")[0])
    return packages


def test_only_the_adapters_and_the_server_import_redis() -> None:
    package = Path(history_svc.__file__).parent
    modules = {path.stem: _imported_packages(path) for path in package.glob("*.py")}
    assert {"servicer", "watcher", "watch", "resume", "consistency"} <= modules.keys()
    assert {name for name, imported in modules.items() if imported & REDIS_PACKAGES} == REDIS_MODULES
