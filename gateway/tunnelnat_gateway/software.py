"""Which gateway software this is: the version built into the archive and the archive's SHA-256.

The SHA-256 is the identity the stack deploys (InstallGatewaySoftware's parameter, every gateway
document's check); the version is for people. Run from the repository's source tree (tests),
there is no archive: the version says so and the hash is None.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

BUILD_INFO = "_build.json"  # written into the archive by tools/gateway_package.py
SOURCE_VERSION = "source"


def archive_path() -> Path | None:
    """The zipapp this module was imported from, or None (a source tree)."""
    archive = getattr(__spec__.loader, "archive", None) if __spec__ else None
    return Path(archive) if archive else None


def build_info(archive: Path | None = None) -> dict[str, str]:
    archive = archive or archive_path()
    if archive is None:
        return {"version": SOURCE_VERSION}
    with zipfile.ZipFile(archive) as zf:
        return json.loads(zf.read(f"tunnelnat_gateway/{BUILD_INFO}"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def identity(archive: Path | None = None) -> dict[str, str | None]:
    """{"version", "sha256", "path"} of the running (or the given) archive."""
    archive = archive or archive_path()
    if archive is None:
        return {"version": SOURCE_VERSION, "sha256": None, "path": None}
    real = Path(os.path.realpath(archive))
    return {"version": build_info(real)["version"], "sha256": file_sha256(real), "path": str(real)}


def main(argv: list[str] | None = None) -> int:
    if argv:
        print("usage: tunnelnat-gateway version", file=sys.stderr)
        return 2
    print(json.dumps(identity(), sort_keys=True))
    return 0
