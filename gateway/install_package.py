"""Install the gateway software (tunnelnat_gateway's zipapp) from the stack's asset bucket.

Not part of the package it installs: the user data runs it at first boot, InstallGatewaySoftware
on every change, and every gateway document when the archive it was synthesized with is missing
(tools/gateway_package.py embeds it). Standard library and the image's boto3 only.

    install_package.py --bucket B --key K --sha256 H --region R [--current]
    install_package.py --parameter NAME [--region R] [--current]

``--parameter`` reads the archive's bucket, key, SHA-256 and region from the SSM parameter the
stack writes (/tunnelnat/<deployment>/gateway-software, JSON): the user data names only the
parameter, so the launch template stays the same when the code changes (docs/gateway-software.md).

The archive is content-addressed, LIB/gateway/<sha256>.pyz, written beside itself and renamed:
a path that exists holds the whole archive, and a document that runs it never sees it change.
``--current`` also points LIB/tunnelnat-gateway.pyz (what the systemd units run) at it, in one
rename of a symbolic link. A download whose SHA-256 is not the one asked for is refused and
nothing changes. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable

LIB = os.environ.get("TUNNELNAT_LIB", "/etc/tunnelnat/lib")
KEEP = 3  # archives kept: the current, the one before it, and a document's in flight
FIELDS = ("bucket", "key", "sha256", "region")


def sha256_of(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def client(service: str, region: str | None) -> object:
    import boto3
    from botocore.config import Config

    # Standard retries ride out a throttle or a new instance's network.
    config = Config(retries={"mode": "standard", "max_attempts": 10})
    return boto3.client(service, region_name=region, config=config)


def fetch(bucket: str, key: str, region: str) -> bytes:
    """The archive from the stack's asset bucket."""
    return client("s3", region).get_object(Bucket=bucket, Key=key)["Body"].read()


def read_parameter(name: str, region: str | None) -> list[str]:
    """[bucket, key, sha256, region] from the stack's parameter (``region``: the parameter's;
    None: the SDK's default), refused unless each is a non-empty string."""
    value = client("ssm", region).get_parameter(Name=name)["Parameter"]["Value"]
    try:
        found = [json.loads(value)[k] for k in FIELDS]
    except (ValueError, KeyError, TypeError):
        found = []
    if not found or not all(isinstance(v, str) and v for v in found):
        raise SystemExit(f"install_package: {name} is not the gateway software's JSON")
    return found


def install(
    bucket: str,
    key: str,
    sha256: str,
    region: str,
    current: bool = False,
    lib: str | None = None,
    get: Callable[[str, str, str], bytes] = fetch,
) -> dict:
    lib = lib or LIB
    versions = os.path.join(lib, "gateway")
    os.makedirs(versions, mode=0o755, exist_ok=True)
    path = os.path.join(versions, sha256 + ".pyz")
    downloaded = False
    if sha256_of(path) != sha256:
        body = get(bucket, key, region)
        got = hashlib.sha256(body).hexdigest()
        if got != sha256:
            raise SystemExit(f"install_package: s3://{bucket}/{key} is {got}, not {sha256}")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # noqa: S103 - root's program, readable by all like /usr/bin
        os.replace(tmp, path)
        downloaded = True
    link = os.path.join(lib, "tunnelnat-gateway.pyz")
    previous = os.path.basename(os.path.realpath(link)).removesuffix(".pyz")
    previous = previous if os.path.lexists(link) else None
    if current and previous != sha256:
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(os.path.join("gateway", sha256 + ".pyz"), tmp)
        os.replace(tmp, link)
    prune(versions, keep={sha256, previous})
    return {
        "sha256": sha256,
        "path": path,
        "downloaded": downloaded,
        "current": bool(current),
        "previous": previous,
        "changed": bool(current) and previous != sha256,
    }


def prune(versions: str, keep: set[str | None]) -> None:
    """Old archives go, except the newest KEEP and those in ``keep``; an archive younger than a
    minute may be one a document just installed, so it stays too."""
    names = [n for n in os.listdir(versions) if n.endswith(".pyz")]
    names.sort(key=lambda n: os.stat(os.path.join(versions, n)).st_mtime, reverse=True)
    for name in names[KEEP:]:
        path = os.path.join(versions, name)
        if name.removesuffix(".pyz") in keep or time.time() - os.stat(path).st_mtime < 60:
            continue
        os.remove(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install_package.py")
    for name in ("parameter", *FIELDS):
        parser.add_argument(f"--{name}")
    parser.add_argument("--current", action="store_true")
    args = parser.parse_args(argv)
    given = [getattr(args, k) for k in FIELDS]
    if args.parameter:
        if any(given[:3]):
            parser.error("--parameter names the archive: no --bucket, --key or --sha256")
        given = read_parameter(args.parameter, args.region)
    elif not all(given):
        parser.error("--bucket, --key, --sha256 and --region (or --parameter) are required")
    bucket, key, sha256, region = given
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise SystemExit(f"install_package: sha256 {sha256!r} is not a SHA-256")
    print(json.dumps(install(bucket, key, sha256, region, args.current), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
