"""What a gateway program imports beyond the standard library: the gateway's python3 has only
the distribution's boto3 (and the programs installed beside each other)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def third_party_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names)
