"""The gateway software in the lab: the archive the stack ships, built once per lab run.

``publish`` builds gateway/tunnelnat_gateway into its zipapp with tools/gateway_package.py (the
stack's own build), puts it in a moto bucket as the CDK puts the asset in its bucket, and writes
the SSM parameter ``/tunnelnat/<deployment>/gateway-software`` the user data and the agents read.
Every document the lab runs is bound to it (``LabPackage.binding``) as synthesis binds the
deployed ones; the gateways install it through gateway/install_package.py, the installer the user
data runs. What the lab tests is therefore the bytes that would be deployed.

A leaf module: it imports nothing of the lab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.gateway_package import ROOT, GatewayPackage, build

BUCKET = "tn-lab-assets"  # the lab's stand-in for the CDK's asset bucket
# Where the user data writes the installer (it is not part of the package it installs) and
# what the systemd units run: the symbolic link --current points at the installed archive.
INSTALLER = "/etc/tunnelnat/lib/install_package.py"
CURRENT = "/etc/tunnelnat/lib/tunnelnat-gateway.pyz"
INSTALLER_SOURCE = ROOT / "gateway" / "install_package.py"
# The user data's install step (stacks/gateway.py INSTALL_SCRIPT; a test keeps them the same):
# $0 the parameter, $1 its region.
MARKER = "/etc/tunnelnat/lib/mark_unhealthy.py"
MARKER_SOURCE = ROOT / "gateway" / "mark_unhealthy.py"
INSTALL_SCRIPT = (
    f'pkg=$(python3 {INSTALLER} --parameter "$0" --region "$1") && python3 "$pkg" activate'
    f' || (python3 {MARKER} "$1" "the gateway software could not be installed"; exit 1)'
)


def parameter_name(deployment: str) -> str:
    """The SSM parameter naming the deployed package (the stack's, docs/gateway-software.md)."""
    return f"/tunnelnat/{deployment}/gateway-software"


@dataclass(frozen=True)
class LabPackage:
    """One archive as published in the lab's moto: where it lies and what it is."""

    package: GatewayPackage
    bucket: str
    key: str
    region: str
    parameter: str

    @property
    def sha256(self) -> str:
        return self.package.sha256

    @property
    def version(self) -> str:
        return self.package.version

    def binding(self) -> dict[str, str]:
        """tools.gateway_package.bind's keyword arguments for this archive."""
        return {
            "sha256": self.sha256,
            "bucket": self.bucket,
            "key": self.key,
            "region": self.region,
        }

    def parameter_value(self) -> dict[str, str]:
        return {**self.binding(), "version": self.version}


def publish(
    clients: Any,
    *,
    deployment: str,
    region: str,
    out_dir: Path,
    root: Path = ROOT,
    bucket: str = BUCKET,
) -> LabPackage:
    """Build the archive from ``root`` into ``out_dir``, upload it to ``bucket`` (key
    ``<sha256>.pyz``, content-addressed as the CDK's assets are) and point the deployment's SSM
    parameter at it. ``clients(service)`` returns a boto3 client for moto."""
    package = build(out_dir, root=root)
    s3 = clients("s3")
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        # us-east-1 takes no LocationConstraint (CreateBucket's documented exception).
        config = {} if region == "us-east-1" else {"LocationConstraint": region}
        s3.create_bucket(Bucket=bucket, **({"CreateBucketConfiguration": config} if config else {}))
    key = f"{package.sha256}.pyz"
    s3.put_object(Bucket=bucket, Key=key, Body=package.path.read_bytes())
    published = LabPackage(package, bucket, key, region, parameter_name(deployment))
    clients("ssm").put_parameter(
        Name=published.parameter,
        Value=json.dumps(published.parameter_value(), sort_keys=True),
        Type="String",
        Overwrite=True,
    )
    return published


def installer_argv(published: LabPackage) -> list[str]:
    """What the user data runs (stacks/gateway.py INSTALL_SCRIPT, the same script): the installer
    fetches the archive the SSM parameter names, then the archive's own ``activate`` verb makes it
    the one the units run. Its last line is activate's JSON."""
    return ["sh", "-c", INSTALL_SCRIPT, published.parameter, published.region]
