"""Build the gateway software into one zipapp, and bind documents to it.

``build()`` packs gateway/tunnelnat_gateway and the pure modules of tunnelnat.core it imports
into ``tunnelnat-gateway-<version>.pyz``: the same bytes from the same sources on any machine
(sorted entries, fixed timestamps and modes), so its SHA-256 changes exactly when the code does.
The stack ships that file as an asset, the lab and the bench run it: what is tested is what is
deployed.

``bind()`` fills a gateway document's placeholders with the archive's SHA-256 and where it lies
(bucket, key, region): the stack binds them with the asset's location, the lab with its moto
bucket's.

    python -m tools.gateway_package [--out DIR]   # build, print {"path", "sha256", "version"}
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "gateway" / "tunnelnat_gateway"
INSTALLER = ROOT / "gateway" / "install_package.py"
# The only modules of the shared core the gateway runs: standard library only (a test keeps it so).
CORE_MODULES = (
    "__init__.py",
    "core/__init__.py",
    "core/lanes.py",
    "core/nat.py",
    "core/swanctl.py",
)
CORE_DIR = ROOT / "lambdas" / "tunnelnat"
DEFAULT_OUT = ROOT / ".deps" / "gateway-package"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
MAIN = (
    "# tunnelnat-gateway: python3 tunnelnat-gateway.pyz VERB [ARGS]\n"
    "import sys\n\nfrom tunnelnat_gateway.__main__ import main\n\nsys.exit(main())\n"
)
# What a gateway document carries in place of the archive's identity until bound.
PLACEHOLDERS = {
    "sha256": "__TUNNELNAT_PACKAGE_SHA256__",
    "bucket": "__TUNNELNAT_PACKAGE_BUCKET__",
    "key": "__TUNNELNAT_PACKAGE_KEY__",
    "region": "__TUNNELNAT_PACKAGE_REGION__",
}


@dataclass(frozen=True)
class GatewayPackage:
    path: Path
    sha256: str
    version: str
    size: int


def project_version(root: Path = ROOT) -> str:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


def sources(root: Path = ROOT) -> dict[str, bytes]:
    """Archive name -> content, sorted: the package (no caches) and the core modules."""
    package_dir = root / "gateway" / "tunnelnat_gateway"
    files = {
        f"tunnelnat_gateway/{p.relative_to(package_dir).as_posix()}": p.read_bytes()
        for p in package_dir.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    for name in CORE_MODULES:
        files[f"tunnelnat/{name}"] = (root / "lambdas" / "tunnelnat" / name).read_bytes()
    return dict(sorted(files.items()))


def archive_bytes(root: Path = ROOT) -> tuple[bytes, str]:
    """The zipapp's bytes and its version (the project's + the sources' digest)."""
    files = sources(root)
    digest = hashlib.sha256()
    for name, content in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    version = f"{project_version(root)}+{digest.hexdigest()[:12]}"
    files["tunnelnat_gateway/_build.json"] = (
        json.dumps({"version": version, "sources_sha256": digest.hexdigest()}, sort_keys=True)
        + "\n"
    ).encode()
    files["__main__.py"] = MAIN.encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix, whatever builds it
            zf.writestr(info, files[name], compresslevel=9)
    # A zipapp may start with a #! line; python3 runs it either way.
    return b"#!/usr/bin/env python3\n" + out.getvalue(), version


def build(out_dir: Path = DEFAULT_OUT, root: Path = ROOT) -> GatewayPackage:
    """The archive under ``out_dir`` (rewritten only when its bytes differ)."""
    data, version = archive_bytes(root)
    sha256 = hashlib.sha256(data).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tunnelnat-gateway-{sha256[:16]}.pyz"
    if not path.exists() or path.read_bytes() != data:
        # A name of its own: two test workers may build the same archive at once.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        tmp.replace(path)
    prune(out_dir, keep=path)
    return GatewayPackage(path=path, sha256=sha256, version=version, size=len(data))


def prune(out_dir: Path, keep: Path, older_than: float = 3600.0) -> None:
    """Archives of earlier sources go once an hour old (a run in progress may still use one)."""
    for old in out_dir.glob("tunnelnat-gateway-*.pyz"):
        try:
            if old != keep and time.time() - old.stat().st_mtime > older_than:
                old.unlink()
        except FileNotFoundError:  # another worker pruned it first
            pass


def bind(content: Any, *, sha256: str, bucket: str, key: str, region: str) -> Any:
    """``content`` (a parsed document, or any JSON-like value) with the placeholders filled.
    ``bucket``, ``key`` and ``region`` may be CDK tokens (strings)."""
    values = {"sha256": sha256, "bucket": bucket, "key": key, "region": region}
    if isinstance(content, str):
        for name, placeholder in PLACEHOLDERS.items():
            content = content.replace(placeholder, values[name])
        return content
    if isinstance(content, Mapping):
        return {k: bind(v, **values) for k, v in content.items()}
    if isinstance(content, list):
        return [bind(v, **values) for v in content]
    return content


def is_bound(content: Any) -> bool:
    text = json.dumps(content)
    return not any(p in text for p in PLACEHOLDERS.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    package = build(args.out)
    print(
        json.dumps(
            {
                "path": str(package.path),
                "sha256": package.sha256,
                "version": package.version,
                "size": package.size,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
