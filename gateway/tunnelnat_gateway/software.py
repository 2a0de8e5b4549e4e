"""Which gateway software this is: the version built into the archive and the archive's SHA-256.

The SHA-256 is the identity the stack deploys (InstallGatewaySoftware's parameter, every gateway
document's check); the version is for people. Run from the repository's source tree (tests),
there is no archive: the version says so and the hash is None.

The deployed one is the stack's SSM parameter ``/tunnelnat/<deployment>/gateway-software`` (JSON
``{"sha256", "version", "bucket", "key", "region"}``): ``report()`` says whether this is it, for
the health agent's report and the pair agent's readiness item (``tunnelnat status``/``doctor``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILD_INFO = "_build.json"  # written into the archive by tools/gateway_package.py
SOURCE_VERSION = "source"
# An SSM parameter name (PutParameter: a-zA-Z0-9_.- and "/" between levels, at most 1011
# characters; https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_PutParameter.html).
PARAMETER_NAME = re.compile(r"^/[A-Za-z0-9_.\-/]{1,1010}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def parameter_for(deployment: str) -> str | None:
    """The stack's parameter for ``deployment`` (None: not a name SSM takes)."""
    name = f"/tunnelnat/{deployment}/gateway-software"
    return name if PARAMETER_NAME.fullmatch(name) else None


def read_deployed(
    parameter: str,
    region: str,
    *,
    client: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """The deployed package's ``{"sha256", "version", ...}`` (GetParameter), or None when it
    cannot be read (no permission, no network, not the JSON the stack writes): whoever asks
    reports "unknown" rather than fail."""
    try:
        if client is None:
            import boto3
            from botocore.config import Config

            # Short: a report waits for this, and "unknown" is an answer.
            config = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 2})
            client = boto3.client("ssm", region_name=region, config=config)
        data = json.loads(client.get_parameter(Name=parameter)["Parameter"]["Value"])
    except Exception as exc:  # noqa: BLE001 - any failure: unknown, said once
        if log is not None:
            log(f"cannot read {parameter}: {type(exc).__name__}: {exc}")
        return None
    if not isinstance(data, dict) or not SHA256.fullmatch(str(data.get("sha256", ""))):
        if log is not None:
            log(f"{parameter} is not the gateway software's JSON")
        return None
    return data


def report(running: dict[str, str | None], deployed: dict[str, Any] | None) -> dict[str, Any]:
    """``{"version", "sha256", "deployed_sha256", "deployed"}``: ``deployed`` is None when
    either side is unknown (run from a source tree, or the parameter unread)."""
    sha256 = running.get("sha256")
    deployed_sha256 = deployed.get("sha256") if deployed else None
    same = None if sha256 is None or deployed_sha256 is None else sha256 == deployed_sha256
    return {
        "version": running.get("version"),
        "sha256": sha256,
        "deployed_sha256": deployed_sha256,
        "deployed": same,
    }


def main(argv: list[str] | None = None) -> int:
    if argv:
        print("usage: tunnelnat-gateway version", file=sys.stderr)
        return 2
    print(json.dumps(identity(), sort_keys=True))
    return 0
