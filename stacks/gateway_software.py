"""GatewaySoftware: the gateway's one package, shipped as an asset and named by an SSM parameter.

- tools/gateway_package.py builds gateway/tunnelnat_gateway (and the pure modules of
  tunnelnat.core it imports) into one reproducible zipapp at synthesis, once per process: its
  SHA-256 changes exactly when the code does.
- The zipapp is an S3 asset (the CDK uploads it to the bootstrap bucket at deploy).
- ``/tunnelnat/<deployment>/gateway-software`` (SSM parameter, JSON {"sha256", "version",
  "bucket", "key", "region"}) says which package the stack deployed. The user data installs from
  it at first boot (gateway/install_package.py --parameter), so the launch template never names
  the package: a code change does not replace the gateways. The pair agent and the health agent
  read it to say whether they run the deployed package.
- ``InstallGatewaySoftware`` (State Manager association on the gateway group, one gateway at a
  time, no error tolerated) installs it on every gateway whenever the hash changes, and on every
  new gateway (docs/gateway-software.md).
- Every gateway document is bound to the same package (Documents: the placeholders of
  gateway/package_check.sh), and installs it itself when a gateway does not have it yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import ArnFormat, Aws, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from tools import gateway_package
from tools.gateway_package import GatewayPackage

DOCUMENT = "InstallGatewaySoftware"
PARAMETER_NAME = "/tunnelnat/{deployment}/gateway-software"
# The longest values a placeholder can be bound to, for the size check at synthesis (the asset's
# bucket and key are tokens until deploy): an S3 bucket name is at most 63 characters, the CDK's
# asset key is <sha256>.<ext> (a margin on top), a region name at most 14 today.
LONGEST_BINDING = {"bucket": "b" * 63, "key": "k" * 96, "region": "r" * 16}

_built: dict[Path, GatewayPackage] = {}


def built_package(root: Path = gateway_package.ROOT) -> GatewayPackage:
    """The package from ``root``'s sources, built once per process (a synthesis builds it once
    however many stacks and tests ask)."""
    if root not in _built:
        out = gateway_package.DEFAULT_OUT if root == gateway_package.ROOT else root / ".build"
        _built[root] = gateway_package.build(out, root)
    return _built[root]


def parameter_name(deployment: str) -> str:
    return PARAMETER_NAME.format(deployment=deployment)


class GatewaySoftware(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        deployment: str,
        package: GatewayPackage | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.package = package or built_package()
        self.sha256 = self.package.sha256
        self.version = self.package.version
        self.asset = s3_assets.Asset(self, "Package", path=str(self.package.path))
        self.bucket = self.asset.s3_bucket_name
        self.key = self.asset.s3_object_key
        self.region = Aws.REGION
        self.parameter_name = parameter_name(deployment)
        self.parameter = ssm.StringParameter(
            self,
            "Parameter",
            parameter_name=self.parameter_name,
            description=f"{deployment}: the gateway software the stack deployed",
            string_value=Stack.of(self).to_json_string(self.identity),
            tier=ssm.ParameterTier.STANDARD,
        )

    @property
    def identity(self) -> dict[str, str]:
        """The parameter's JSON (bucket, key and region are tokens until deploy)."""
        return {
            "sha256": self.sha256,
            "version": self.version,
            "bucket": self.bucket,
            "key": self.key,
            "region": self.region,
        }

    @property
    def parameter_arn(self) -> str:
        """The parameter's ARN from its fixed name (a literal name in IAM, no reference)."""
        return Stack.of(self).format_arn(
            service="ssm",
            resource="parameter",
            resource_name=self.parameter_name.removeprefix("/"),
            arn_format=ArnFormat.SLASH_RESOURCE_NAME,
        )

    @property
    def association_parameters(self) -> dict[str, str]:
        """InstallGatewaySoftware's parameters: the archive's hash and where it lies."""
        return {
            "Sha256": self.sha256,
            "Bucket": self.bucket,
            "Key": self.key,
            "Region": self.region,
        }

    def bind(self, content: Any) -> Any:
        """A gateway document's content with the package's placeholders filled (tokens)."""
        return gateway_package.bind(
            content, sha256=self.sha256, bucket=self.bucket, key=self.key, region=self.region
        )

    def bind_longest(self, content: Any) -> Any:
        """The same, with the longest values the tokens can take: what the size check measures."""
        return gateway_package.bind(content, sha256=self.sha256, **LONGEST_BINDING)

    def statements(self) -> list[iam.PolicyStatement]:
        """What a gateway needs to install it: the one object, the one parameter."""
        return [
            iam.PolicyStatement(
                sid="FetchTheGatewaySoftware",
                actions=["s3:GetObject"],
                resources=[self.asset.bucket.arn_for_objects(self.key)],
            ),
            iam.PolicyStatement(
                # The user data installs from it; the pair and health agents compare their own
                # hash with it.
                sid="ReadTheDeployedSoftware",
                actions=["ssm:GetParameter"],
                resources=[self.parameter_arn],
            ),
        ]
