"""Install the gateway software (tunnelnat_gateway's zipapp) from the stack's asset bucket.

Not part of the package it installs: the user data runs it at first boot, InstallGatewaySoftware
on every change, and every gateway document when the archive it was synthesized with is missing
(tools/gateway_package.py embeds it). Standard library and the image's boto3 only.

    install_package.py --bucket B --key K --sha256 H --region R [--current]

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


def sha256_of(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def fetch(bucket: str, key: str, region: str) -> bytes:
    import boto3
    from botocore.config import Config

    # The stack's asset bucket; standard retries ride out a throttle or a new instance's network.
    config = Config(retries={"mode": "standard", "max_attempts": 10})
    s3 = boto3.client("s3", region_name=region, config=config)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def install(
    bucket: str,
    key: str,
    sha256: str,
    region: str,
    current: bool = False,
    lib: str = LIB,
    get: Callable[[str, str, str], bytes] = fetch,
) -> dict:
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
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--current", action="store_true")
    args = parser.parse_args(argv)
    if len(args.sha256) != 64 or any(c not in "0123456789abcdef" for c in args.sha256):
        raise SystemExit(f"install_package: --sha256 {args.sha256!r} is not a SHA-256")
    result = install(args.bucket, args.key, args.sha256, args.region, args.current)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
