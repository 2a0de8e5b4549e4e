"""Gateway: the VPN/NAT instance, self-healing, with addresses that outlive it.

- An Auto Scaling group of one (Ubuntu 24.04 LTS, strongSwan/nftables/boto3 from its own
  archive) replaces a failed gateway, also one whose boot-time plumbing failed (it marks itself
  unhealthy).
- Its cloud-init user data writes the boot program (gateway/tunnelnat_boot.py) and the systemd
  units of gateway/systemd/: at every boot the saved NAT table (guard first) is restored before
  the network, G's ENI is attached and configured, then the table is synced from DynamoDB.
- The addresses the world knows stay out of the replaceable part: a standalone ENI carries G
  (the fixed private IP every host route points at) and the Elastic IP E (the VPN endpoint the
  partner configured); each new gateway re-attaches that ENI at boot.
- ``ConfigureGateway`` (the NAT table, its guard, forwarding) and ``ConfigureTunnel`` (strongSwan,
  the PSK) are applied by two State Manager associations that target the gateway's tag, so they
  run on the first instance and again on every replacement; either order is fail-closed
  (docs/stack.md, Order on a new gateway).
"""

from __future__ import annotations

import base64
import gzip
import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from aws_cdk import ArnFormat, Aws, Duration, RemovalPolicy, Stack, Tags
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.documents import Documents
from stacks.nag import acknowledge, wildcard_arn
from stacks.settings import (
    DEPLOYMENT_TAG,
    GATEWAY_TAG,
    ROLE_GATEWAY,
    ROLE_TAG,
    StackSettings,
)
from tunnelnat.core.config import TunnelnatConfig

GATEWAY_DIR = Path(__file__).resolve().parents[1] / "gateway"
BOOT_PROGRAM = GATEWAY_DIR / "tunnelnat_boot.py"
UNITS_DIR = GATEWAY_DIR / "systemd"
# The units the user data installs, in boot order (their Before/After say the same).
BOOT_UNITS = ("tunnelnat-restore.service", "tunnelnat-boot.service", "tunnelnat-sync.service")
SSM_AGENT_UNIT = "snap.amazon-ssm-agent.amazon-ssm-agent.service"  # Ubuntu's agent is a snap
# What the gateway installs from its image's archive at first boot; the lab installs the same
# list (Makefile GATEWAY_PACKAGES, compared by tests/infra). Not the `strongswan` metapackage:
# it adds strongswan-starter, a second charon.
GATEWAY_PACKAGES = ("strongswan-swanctl", "charon-systemd", "nftables", "python3-boto3")
# Canonical's public SSM parameters: resolved by CloudFormation at deploy time (no lookup).
UBUNTU_AMI_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/{arch}/hvm/ebs-gp3/ami-id"
)
ROOT_DEVICE = "/dev/sda1"  # Ubuntu's AMIs (Amazon Linux's is /dev/xvda)
USER_DATA_LIMIT = 16 * 1024  # EC2's limit on user data, before base64
CONFIGURE_SCHEDULE = "rate(30 minutes)"
METRIC_NAMESPACE = "tunnelnat"
IPSEC_BACKEND = "kernel"  # the kernel's ESP in AWS (the lab uses strongSwan's libipsec)


class Gateway(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: TunnelnatConfig,
        settings: StackSettings,
        vpc: ec2.IVpc,
        subnet: ec2.ISubnet,
        table: dynamodb.ITable,
        documents: Documents,
        internet_ready: Construct | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        deployment = settings.deployment
        # The group propagates these to each instance at launch (the launch template does not
        # repeat them); the ENI needs them for the attach permission's condition.
        for key, value in (
            (ROLE_TAG, ROLE_GATEWAY),
            (DEPLOYMENT_TAG, deployment),
            (GATEWAY_TAG, deployment),
        ):
            Tags.of(self).add(key, value, exclude_resource_types=["AWS::EC2::LaunchTemplate"])
        Tags.of(self).add("Name", f"{deployment}-gateway")

        # -- the pre-shared key: created (random, never in the template) or imported by name ---
        if settings.psk_secret_name:
            self.psk: secretsmanager.ISecret = secretsmanager.Secret.from_secret_name_v2(
                self, "Psk", settings.psk_secret_name
            )
            psk_name = settings.psk_secret_name
            # Secrets Manager appends "-" and six random characters to a secret's name in its ARN.
            psk_arn = stack.format_arn(
                service="secretsmanager",
                resource="secret",
                resource_name=f"{psk_name}-??????",
                arn_format=ArnFormat.COLON_RESOURCE_NAME,
            )
        else:
            secret = secretsmanager.Secret(
                self,
                "Psk",
                description=f"{deployment}: IPsec pre-shared key shared with the partner",
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    password_length=48, exclude_punctuation=True
                ),
                removal_policy=RemovalPolicy.RETAIN,
            )
            acknowledge(
                secret,
                "AwsSolutions-SMG4",
                "The IPsec PSK is agreed with the partner out of band; rotating it "
                "automatically would take the tunnel down. It is changed by hand, in step "
                "with the partner (docs/stack.md).",
            )
            self.psk = secret
            psk_name = secret.secret_name
            psk_arn = secret.secret_arn

        # -- security group: IKE and ESP from T only; forwarded traffic from the gateway subnet --
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description=f"{deployment} gateway: IKE/ESP from the partner endpoint, "
            "forwarding from the gateway subnet",
            allow_all_outbound=True,
        )
        partner = ec2.Peer.ipv4(f"{config.partner_endpoint}/32")
        self.security_group.add_ingress_rule(partner, ec2.Port.udp(500), "IKE from the partner")
        self.security_group.add_ingress_rule(
            partner, ec2.Port.udp(4500), "IKE/ESP NAT-T from the partner"
        )
        self.security_group.add_ingress_rule(
            partner,
            ec2.Port(protocol=ec2.Protocol.ESP, string_representation="ESP"),
            "ESP from the partner",
        )
        # Forwarded packets: from the gateway's subnet (host routes via G), and in route-table
        # mode from the whole VPC, secondary CIDRs too (its subnets' route tables send the
        # partner's networks to G's ENI). nftables forwards enrolled sources only, and drops
        # (and counts) the rest: a neighbour behind the same table gets nowhere.
        forwarded = settings.vpc_networks if settings.route_table_mode else []
        for network in forwarded or [config.gateway_subnet_cidr]:
            self.security_group.add_ingress_rule(
                ec2.Peer.ipv4(str(network)),
                ec2.Port.all_traffic(),
                "instances' packets routed via G (nftables forwards enrolled sources only)",
            )

        # -- the standalone ENI with G, and the Elastic IP E on it ------------------------------
        self.eni = ec2.CfnNetworkInterface(
            self,
            "Eni",
            subnet_id=subnet.subnet_id,
            private_ip_address=str(config.gateway_private_ip),
            group_set=[self.security_group.security_group_id],
            source_dest_check=False,
            description=f"{deployment} gateway G: every enrolled host route points here",
        )
        if settings.gateway_eip_allocation_id:
            allocation_id = settings.gateway_eip_allocation_id
            self.public_ip: str = str(settings.gateway_eip_address)
        else:
            eip = ec2.CfnEIP(self, "Eip", domain="vpc")
            # The partner whitelists E: deleting the stack must not release it.
            eip.apply_removal_policy(RemovalPolicy.RETAIN)
            allocation_id = eip.attr_allocation_id
            self.public_ip = eip.attr_public_ip
        association = ec2.CfnEIPAssociation(
            self,
            "EipAssociation",
            allocation_id=allocation_id,
            network_interface_id=self.eni.ref,
            private_ip_address=str(config.gateway_private_ip),
        )
        if internet_ready is not None:
            association.node.add_dependency(internet_ready)

        # -- the instance role: SSM core plus exactly what the gateway does --------------------
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"{deployment} gateway: SSM agent, read its table and PSK, put TunnelUp",
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")
            ],
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadItsTable",
                actions=["dynamodb:GetItem", "dynamodb:Query"],
                resources=[table.table_arn],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadThePsk",
                actions=["secretsmanager:GetSecretValue"],
                resources=[psk_arn],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="PutTunnelMetrics",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": METRIC_NAMESPACE}},
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="SeeItsEni",
                actions=["ec2:DescribeNetworkInterfaces"],
                resources=["*"],
            )
        )
        own_tags = {
            f"aws:ResourceTag/{ROLE_TAG}": ROLE_GATEWAY,
            f"aws:ResourceTag/{DEPLOYMENT_TAG}": deployment,
        }
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")
        eni_arn = stack.format_arn(
            service="ec2", resource="network-interface", resource_name=self.eni.ref
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="AttachTheGatewayEni",
                actions=["ec2:AttachNetworkInterface"],
                resources=[eni_arn, instances],
                conditions={"StringEquals": own_tags},
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="SourceDestCheckOffOnGateways",
                actions=["ec2:ModifyInstanceAttribute"],
                resources=[instances],
                conditions={"StringEquals": own_tags},
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReportBootFailure",
                actions=["autoscaling:SetInstanceHealth"],
                resources=[
                    stack.format_arn(
                        service="autoscaling",
                        resource="autoScalingGroup",
                        resource_name="*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
                conditions={"StringEquals": own_tags},
            )
        )

        # -- launch template and the Auto Scaling group of one ---------------------------------
        machine_image = _machine_image(settings)
        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            machine_image=machine_image,
            instance_type=ec2.InstanceType(settings.gateway_instance_type),
            role=self.role,
            security_group=self.security_group,
            associate_public_ip_address=True,
            user_data=ec2.UserData.custom(
                boot_user_data(
                    region=Aws.REGION,
                    eni_id=self.eni.ref,
                    gateway_ip=config.gateway_private_ip,
                    subnet=config.gateway_subnet_cidr,
                    partner_endpoint=config.partner_endpoint,
                )
            ),
            require_imdsv2=True,
            http_put_response_hop_limit=1,
            instance_metadata_tags=True,
            detailed_monitoring=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name=ROOT_DEVICE,
                    volume=ec2.BlockDeviceVolume.ebs(
                        10, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3
                    ),
                )
            ],
        )
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnets=[subnet]),
            launch_template=self.launch_template,
            min_capacity=1,
            max_capacity=1,
            health_checks=autoscaling.HealthChecks.ec2(grace_period=Duration.minutes(15)),
            # Replace by terminating first: the ENI can belong to one instance at a time.
            min_healthy_percentage=0,
            max_healthy_percentage=100,
            update_policy=autoscaling.UpdatePolicy.rolling_update(
                max_batch_size=1, min_instances_in_service=0
            ),
        )
        # The group only launches once the ENI and E exist (the boot script attaches them).
        self.group.node.add_dependency(association)
        acknowledge(
            self.group,
            "AwsSolutions-AS3",
            "Gateway launches and terminations are announced on the alarm topic by an "
            "EventBridge rule (Monitoring), which also reaches e-mail and chat subscribers.",
        )

        # -- ConfigureGateway and ConfigureTunnel on the first gateway and on every replacement
        # ConfigureGateway: the NAT table (guard first), then forwarding.
        gateway_parameters = {
            "PartnerNetworks": ",".join(str(n) for n in config.partner_networks),
            "TableName": table.table_name,
            "Region": Aws.REGION,
            "NatMode": config.nat_mode.value,
            "SharedAddress": str(config.shared_address) if config.shared_address else "none",
            "IpsecBackend": IPSEC_BACKEND,
            "TunnelMss": str(config.tunnel_mss),
        }
        # ConfigureTunnel: strongSwan's connection to the partner and the PSK.
        tunnel_parameters = {
            "PartnerEndpoint": str(config.partner_endpoint),
            "PartnerNetworks": ",".join(str(n) for n in config.partner_networks),
            "PublicAddresses": ",".join(str(a) for a in config.public_addresses),
            "LocalId": settings.local_id or self.public_ip,
            "PskSecretName": psk_name,
            "Region": Aws.REGION,
            "IpsecBackend": IPSEC_BACKEND,
            "TunnelName": settings.tunnel_name,
            **partner_parameters(settings),
        }
        # The health agent has its own document and association (stacks/health_agent.py).
        self.association = self._configure_association(
            documents, deployment, "ConfigureGateway", gateway_parameters
        )
        # The PSK's rollout (stacks/psk_rollout.py) sends this one with these parameters.
        self.tunnel_association = self._configure_association(
            documents, deployment, "ConfigureTunnel", tunnel_parameters
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/"
            "AmazonSSMManagedInstanceCore]",
            "The AWS-maintained minimum for the SSM agent (Run Command, State Manager); "
            "a copy would drift as AWS changes what the agent needs.",
        )
        for finding, reason in (
            (
                "Resource::*",
                "cloudwatch:PutMetricData and ec2:DescribeNetworkInterfaces have no "
                "resource-level permissions; PutMetricData is limited to the tunnelnat namespace.",
            ),
            (
                f"Resource::{wildcard_arn(self, 'ec2', 'instance/*')}",
                "Gateway instances are created by the Auto Scaling group, so their IDs are "
                "unknown; the statements require the gateway role and deployment tags.",
            ),
            (
                f"Resource::{wildcard_arn(self, 'autoscaling', 'autoScalingGroup:*')}",
                "A group's ARN holds a generated UUID; the statement requires the gateway's tags, "
                "which only this deployment's gateway group carries.",
            ),
        ):
            acknowledge(self.role, f"AwsSolutions-IAM5[{finding}]", reason)
        self.psk_name = psk_name

    def _configure_association(
        self, documents: Documents, deployment: str, document: str, parameters: dict[str, str]
    ) -> ssm.CfnAssociation:
        """``document`` on the gateway's tag: on each new gateway, on a parameter change, and on
        a schedule. Two such associations run in no set order (docs/stack.md)."""
        return ssm.CfnAssociation(
            self,
            document,
            name=documents.require(document).ref,
            association_name=f"{deployment}-{document}",
            document_version="$DEFAULT",
            targets=[
                ssm.CfnAssociation.TargetProperty(key=f"tag:{GATEWAY_TAG}", values=[deployment])
            ],
            parameters=documents.check_parameters(document, parameters),
            compliance_severity="CRITICAL",
            max_concurrency="1",
            max_errors="1",
            # AWS runs an association when it is created or changed and on each new target; a
            # reboot is not documented to re-run it (the boot units restore the gateway). The
            # schedule is the backstop: drift (a hand edit, a failed first run) is repaired.
            schedule_expression=CONFIGURE_SCHEDULE,
        )


def _machine_image(settings: StackSettings) -> ec2.IMachineImage:
    if settings.gateway_ami_id:
        # A pre-baked image must be built from the Ubuntu one (root device, packages, agent).
        assert settings.region is not None  # enforced by StackSettings
        return ec2.MachineImage.generic_linux({settings.region: settings.gateway_ami_id})
    return ec2.MachineImage.from_ssm_parameter(
        UBUNTU_AMI_PARAMETER.format(arch=ubuntu_architecture(settings.gateway_instance_type)),
        os=ec2.OperatingSystemType.LINUX,
    )


def ubuntu_architecture(instance_type: str) -> str:
    """Canonical's name for the instance type's architecture (Graviton types are arm64)."""
    arch = ec2.InstanceType(instance_type).architecture
    return "arm64" if arch == ec2.InstanceArchitecture.ARM_64 else "amd64"


def _packed(path: Path) -> str:
    """A file for write_files as gz+b64: the boot program fits EC2's 16 KB with room to spare."""
    return base64.b64encode(gzip.compress(path.read_bytes(), mtime=0)).decode()


def _literal(text: str, indent: int = 6) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}{line}" if line else "" for line in text.splitlines())


def boot_user_data(
    *,
    region: str,
    eni_id: str,
    gateway_ip: IPv4Address,
    subnet: IPv4Network,
    partner_endpoint: IPv4Address,
) -> str:
    """The gateway's cloud-config: packages from the image's archive, the boot program and the
    units of gateway/systemd/ (no AWS CLI anywhere). ``region`` and ``eni_id`` may be tokens.

    First boot: the units are enabled and the ENI attached in runcmd (after the packages); the
    SSM agent is held until then, so ConfigureGateway never runs on a half-installed gateway.
    Every later boot: systemd runs the units in their order, the agent after tunnelnat-boot.
    """
    boot_config = {
        "region": region,
        "eni_id": eni_id,
        "gateway": f"{gateway_ip}/{subnet.prefixlen}",
        "partner_endpoint": str(partner_endpoint),
        "subnet_router": str(subnet.network_address + 1),  # the VPC router: the subnet's .1
    }
    files = [
        ("/etc/tunnelnat/boot.json", "0644", "", json.dumps(boot_config, indent=1)),
        ("/etc/tunnelnat/lib/tunnelnat_boot.py", "0755", "gz+b64", _packed(BOOT_PROGRAM)),
        *(
            (f"/etc/systemd/system/{unit}", "0644", "", (UNITS_DIR / unit).read_text())
            for unit in BOOT_UNITS
        ),
        (
            f"/etc/systemd/system/{SSM_AGENT_UNIT}.d/tunnelnat.conf",
            "0644",
            "",
            (UNITS_DIR / "ssm-agent-after-boot.conf").read_text(),
        ),
    ]
    out = ["#cloud-config", "package_update: true", "packages:"]
    out += [f"  - {name}" for name in GATEWAY_PACKAGES]
    out.append("write_files:")
    for path, mode, encoding, content in files:
        out += [f"  - path: {path}", f"    permissions: '{mode}'"]
        if encoding:
            out += [f"    encoding: {encoding}", f"    content: {content}"]
        else:
            out += ["    content: |", _literal(content)]
    hold = f"/run/systemd/system/{SSM_AGENT_UNIT}.d"
    out += [
        # The network stage (bootcmd) runs before sysinit.target, so before the agent starts:
        # on the first boot only, a runtime condition holds the agent until runcmd releases it.
        "bootcmd:",
        "  - - cloud-init-per",
        "    - instance",
        "    - tunnelnat-hold-ssm-agent",
        "    - sh",
        "    - -c",
        f"    - mkdir -p {hold} && printf '[Unit]\\nConditionPathExists=/run/tunnelnat-ready\\n'"
        f" > {hold}/tunnelnat-first-boot.conf && systemctl daemon-reload",
        "runcmd:",
        "  - [systemctl, daemon-reload]",
        f"  - [systemctl, enable, {', '.join(BOOT_UNITS)}]",
        "  - [systemctl, start, tunnelnat-boot.service]",
        "  - [touch, /run/tunnelnat-ready]",
        f"  - [systemctl, start, {SSM_AGENT_UNIT}]",
    ]
    return "\n".join(out) + "\n"


def partner_parameters(settings: StackSettings) -> dict[str, str]:
    """ConfigureTunnel's partner settings (docs/stack.md, Partner worksheet)."""
    return {
        "IkeProposals": ",".join(settings.ike_proposals),
        "EspProposals": ",".join(settings.esp_proposals),
        "IkeLifetimes": ",".join(map(str, settings.ike_lifetimes)),
        "ChildLifetimes": ",".join(map(str, settings.child_lifetimes)),
        "Dpd": f"{settings.dpd_delay_seconds},{settings.dpd_timeout_seconds}",
        "RemoteId": settings.remote_id or "",
        "SelectorLayout": settings.selector_layout,
        "KeyingTries": str(settings.keyingtries),
        "StartAction": settings.start_action,
    }
