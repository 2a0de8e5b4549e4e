"""Gateway: the VPN/NAT instance, self-healing, with addresses that outlive it.

- An Auto Scaling group of one (Ubuntu 24.04 LTS, strongSwan/nftables/boto3 from its own
  archive) replaces a failed gateway, also one whose boot-time plumbing failed (it marks itself
  unhealthy).
- Its cloud-init user data writes the package's installer (gateway/install_package.py), boot.json
  and the systemd units of gateway/systemd/, installs the gateway software's package named by the
  stack's SSM parameter (stacks/gateway_software.py), then starts the units, which run the
  package: at every boot the saved NAT table (guard first) is restored before the network, G's
  ENI is attached and configured, then the table is synced from DynamoDB. The user data never
  names the package itself: a code change does not change the launch template (no gateway is
  replaced for it); the ``InstallGatewaySoftware`` association upgrades the gateways in place.
- The addresses the world knows stay out of the replaceable part: a standalone ENI carries G
  (the fixed private IP every host route points at) and the Elastic IP E (the VPN endpoint the
  partner configured); each new gateway re-attaches that ENI at boot.
- ``ConfigureGateway`` (the NAT table, its guard, forwarding) and ``ConfigureTunnel`` (strongSwan,
  the PSK) are applied by two State Manager associations that target the gateway group's
  ``aws:autoscaling:groupName`` tag (which no user can set: issue 21), so they run on the first
  instance and again on every replacement; either order is fail-closed (docs/stack.md, Order on
  a new gateway).
- Pair mode (``tunnelnat:gatewayPair``, the default; /work/notes/PAIR.md, docs/stack.md): the same
  group holds two gateways in G's subnet. The one G's ENI is attached to is the active; the other
  is a warm standby whose pair agent (the package's ``pair`` verb) hears the active's heartbeat
  (UDP 7465, between the gateways only) and takes the ENI over when it stops. EC2 allows one
  attachment at a time: the attachment decides who is active.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import jsii
from aws_cdk import (
    Annotations,
    ArnFormat,
    Aws,
    Duration,
    IStableStringProducer,
    Lazy,
    RemovalPolicy,
    Stack,
    Tags,
)
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.documents import Documents
from stacks.gateway_software import DOCUMENT as INSTALL_DOCUMENT
from stacks.gateway_software import GatewaySoftware
from stacks.lanes import Lanes
from stacks.nag import acknowledge, wildcard_arn
from stacks.settings import (
    DEPLOYMENT_TAG,
    GATEWAY_TAG,
    GROUP_NAME_TAG,
    ROLE_GATEWAY,
    ROLE_TAG,
    StackSettings,
)
from tunnelnat.core.config import TunnelnatConfig
from tunnelnat.core.lanes import Lane
from tunnelnat.core.partners import Partner, Partners

GATEWAY_DIR = Path(__file__).resolve().parents[1] / "gateway"
# The launch template tags each gateway's primary ENI at launch (with the role and deployment
# tags): the one ENI the gateway may modify (its source/destination check).
PRIMARY_ENI_TAG, PRIMARY_ENI_VALUE = "tunnelnat:interface", "gateway-primary"
# The package's installer: written by the user data, run by it at first boot (the package itself
# comes from the stack's SSM parameter), and embedded in the gateway documents.
INSTALLER = GATEWAY_DIR / "install_package.py"
INSTALLER_PATH = "/etc/tunnelnat/lib/install_package.py"
PACKAGE_PATH = "/etc/tunnelnat/lib/tunnelnat-gateway.pyz"  # what the units run (a symlink)
# runcmd's first-boot install: the fetcher prints the archive's path (LIB/gateway/<sha256>.pyz),
# whose ``activate`` verb points the units' link at it. $0: the parameter, $1: the region.
# A first boot whose install fails marks the instance Unhealthy (gateway/mark_unhealthy.py): Auto
# Scaling replaces it rather than leaving a gateway with no boot, no agent and no tunnel.
MARKER = GATEWAY_DIR / "mark_unhealthy.py"
MARKER_PATH = "/etc/tunnelnat/lib/mark_unhealthy.py"
INSTALL_SCRIPT = (
    f'pkg=$(python3 {INSTALLER_PATH} --parameter "$0" --region "$1") && python3 "$pkg" activate'
    f' || (python3 {MARKER_PATH} "$1" "the gateway software could not be installed"; exit 1)'
)
PAIR_UNIT = "tunnelnat-pair.service"
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
IPSEC_BACKEND = "kernel"  # the kernel's ESP in AWS (the lab uses strongSwan's libipsec)
# The pair agent's settings (pair.json; PAIR.md). Detection takes misses x interval (2 s); the
# hold-down keeps a just-moved ENI where it is (no flapping between two half-alive gateways).
HEARTBEAT_PORT = 7465
HEARTBEAT_INTERVAL_SECONDS = 0.5
HEARTBEAT_MISSES = 4
HOLD_DOWN_SECONDS = 60
# The pair's items in the controller's table (pk values): gateway/<instance-id> is each agent's
# readiness, meta/pair the active and the last failover.
READINESS_PK = "gateway"
PAIR_META_PK, PAIR_META_SK = "meta", "pair"
# The only attributes a gateway may touch in the meta partition (the controller's generation and
# gateway records live there too: a gateway can add these to an item, never change theirs).
PAIR_META_ATTRIBUTES = (
    "pk",
    "sk",
    "active",
    "active_since",
    "last_failover",
    "failovers",
    "last_switchover",
    "switchovers",
)
# A deploy replaces the pair one gateway at a time and waits for each new one to say it is a
# ready standby (the agent's SignalResource). The wait covers a first boot: the packages from
# the archive (1-3 min), the boot, the SSM agent's registration and the first runs of the
# ConfigureGateway and ConfigureTunnel associations on the new instance ("within minutes" of the
# target appearing), then the NAT table's sync. 20 minutes is several times that, and bounds a
# deploy whose new gateway never gets ready: CloudFormation rolls back instead of waiting.
READY_SIGNAL_TIMEOUT = Duration.minutes(20)
# The active's agent hands G over to the standby when Auto Scaling terminates it (the hook holds
# the instance in Terminating:Wait): a planned handover takes seconds; the agent completes the
# action itself, or after a bounded wait when there is no ready standby. The hook's timeout only
# matters when the agent is dead: then the instance goes after 5 minutes (CONTINUE) and the
# standby takes over by failover.
TERMINATING_HOOK_TIMEOUT = Duration.minutes(5)
# cloud-init's network update events (cloudinit.readthedocs.io/en/latest/explanation/events.html):
# EC2's datasource defaults to boot-new-instance and hotplug since cloud-init 24.1
# (canonical/cloud-init#4799); hotplug renders netplan for a hot-plugged ENI and applies it,
# undoing what the boot and the pair agent configure on G's link (kubernetes/kops#17881, turned
# off in #17882). Only the first boot's network configuration, as before 24.1.
CLOUD_INIT_NETWORK_UPDATES = ("boot-new-instance",)
# Where ConfigureTunnel records each tunnel it configured (<tunnel>.json, with its CHILD_SA
# names: gateway/tunnelnat_gateway/tunnel.py): with several partners the pair agent reads the
# tunnels there, so adding a partner never changes pair.json (the launch template's user data:
# a change would replace both gateways and every partner's SAs with them).
TUNNELS_DIR = "/etc/tunnelnat/tunnels"


def terminating_hook_name(deployment: str) -> str:
    """The gateway group's termination hook. Not ``tunnelnat-...``: the controller's Lifecycle
    rule and handler take every hook named so as theirs to complete (tunnelnat.events
    HOOK_PREFIX), and this one only the gateway's agent completes, after the handover."""
    return f"gateway-{deployment}-terminating"


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
        software: GatewaySoftware,
        internet_ready: Construct | None = None,
        failover_topic: sns.ITopic | None = None,
        failover_topic_key: kms.IKey | None = None,
        partners: Partners | None = None,
        lanes: Lanes | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        deployment = settings.deployment
        self.pair = settings.gateway_pair
        self.psk_key: kms.Key | None = None
        # A partners file: a tunnel, PSK secret and ConfigureTunnel association per partner.
        assert (partners is None) == (lanes is None)
        self.lanes = lanes
        self.lane_psks: dict[str, secretsmanager.ISecret] = {}
        self.tunnel_associations: dict[str, ssm.CfnAssociation] = {}
        self._layouts = {p.name: p.layout for p in partners.partners} if partners else {}
        # The group's explicit name: the associations target it and every IAM condition on a
        # gateway instance names it (aws:autoscaling:groupName, which no user can set).
        self.group_name = settings.gateway_group_name
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
        psk_arns: list[str] = []
        if partners is not None:
            # Each partner's own secret, named in the file (auth.psk_secret; the settings refuse
            # an ARN and certificates): the operator creates it, as psk_secret_name's.
            for partner in partners.partners:
                name = _psk_name(partner)
                self.lane_psks[partner.name] = secretsmanager.Secret.from_secret_name_v2(
                    self, f"Psk-{partner.name}", name
                )
                psk_arns.append(
                    stack.format_arn(
                        service="secretsmanager",
                        resource="secret",
                        resource_name=f"{name}-??????",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                )
            self.psk: secretsmanager.ISecret | None = None
            psk_name: str | None = None
        elif settings.psk_secret_name:
            self.psk: secretsmanager.ISecret = secretsmanager.Secret.from_secret_name_v2(
                self, "Psk", settings.psk_secret_name
            )
            psk_name = settings.psk_secret_name
            # Secrets Manager appends "-" and six random characters to a secret's name in its ARN.
            psk_arns.append(
                stack.format_arn(
                    service="secretsmanager",
                    resource="secret",
                    resource_name=f"{psk_name}-??????",
                    arn_format=ArnFormat.COLON_RESOURCE_NAME,
                )
            )
        else:
            # A customer-managed key (rotated yearly by KMS) rather than Secrets Manager's
            # aws/secretsmanager key: its key policy is ours to read and audit, and a key grant
            # elsewhere in the account can never open it (Secrets Manager User Guide, Secret
            # encryption and decryption).
            self.psk_key = kms.Key(
                self,
                "PskKey",
                description=f"{deployment}: encrypts the IPsec pre-shared key",
                enable_key_rotation=True,
                removal_policy=RemovalPolicy.RETAIN,
            )
            secret = secretsmanager.Secret(
                self,
                "Psk",
                description=f"{deployment}: IPsec pre-shared key shared with the partner",
                encryption_key=self.psk_key,
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
            psk_arns.append(secret.secret_arn)

        # -- security group: IKE and ESP from T only; forwarded traffic from the gateway subnet --
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description=f"{deployment} gateway: IKE/ESP from the partner endpoint, "
            "forwarding from the gateway subnet",
            allow_all_outbound=True,
        )
        endpoints = (
            [(lane.endpoint, f"partner {lane.name}") for lane in lanes.lanes]
            if lanes is not None
            else [(config.partner_endpoint, "the partner")]
        )
        for endpoint, who in endpoints:
            partner = ec2.Peer.ipv4(f"{endpoint}/32")
            self.security_group.add_ingress_rule(partner, ec2.Port.udp(500), f"IKE from {who}")
            self.security_group.add_ingress_rule(
                partner, ec2.Port.udp(4500), f"IKE/ESP NAT-T from {who}"
            )
            self.security_group.add_ingress_rule(
                partner,
                ec2.Port(protocol=ec2.Protocol.ESP, string_representation="ESP"),
                f"ESP from {who}",
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
        if self.pair:
            # The heartbeat: from one gateway's primary address to the other's, both in this
            # group (the rule names the group itself, not the subnet).
            self.security_group.add_ingress_rule(
                self.security_group,
                ec2.Port.udp(HEARTBEAT_PORT),
                "the gateway pair's heartbeat, between the two gateways only",
            )
            # The standby's second opinion before it forces the ENI away: does the active's
            # primary address still answer an echo request?
            self.security_group.add_ingress_rule(
                self.security_group,
                ec2.Port.icmp_ping(),
                "the gateway pair's reachability check, between the two gateways only",
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

        # -- the instance role: what the SSM agent needs plus exactly what the gateway does -----
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"{deployment} gateway: SSM agent, read its table and PSK, put TunnelUp",
        )
        for statement in (*ssm_agent_statements(), *software.statements()):
            self.role.add_to_policy(statement)
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadItsTable",
                actions=["dynamodb:GetItem", "dynamodb:Query"],
                # With lanes: every partner's table of mappings too (the sync reads each).
                resources=[table.table_arn, *(lanes.table_arns if lanes is not None else ())],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadThePsk",
                actions=["secretsmanager:GetSecretValue"],
                resources=psk_arns,
            )
        )
        if lanes is not None:
            self.role.add_to_policy(
                iam.PolicyStatement(
                    # ConfigureGateway reads the lanes (PartnersPath). GetParametersByPath is
                    # authorized against the path in the request (Systems Manager User Guide,
                    # "How Parameter Store authorizes parameter retrieval").
                    sid="ReadTheLanes",
                    actions=["ssm:GetParametersByPath"],
                    resources=[lanes.path_arn],
                )
            )
        if self.psk_key is not None:
            self.role.add_to_policy(
                iam.PolicyStatement(
                    # Only through Secrets Manager (kms:ViaService), never a bare Decrypt.
                    sid="DecryptThePsk",
                    actions=["kms:Decrypt"],
                    resources=[self.psk_key.key_arn],
                    conditions={
                        "StringEquals": {
                            "kms:ViaService": f"secretsmanager.{Aws.REGION}.amazonaws.com"
                        }
                    },
                )
            )
            self._lock_the_psk(secret, settings)
        self.role.add_to_policy(
            iam.PolicyStatement(
                # This deployment's namespace only: another deployment's gateway, or anything
                # else with PutMetricData, cannot publish TunnelUp here, nor ours there.
                sid="PutTunnelMetrics",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={
                    "StringEquals": {"cloudwatch:namespace": settings.gateway_metric_namespace}
                },
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                # G's ENI, and its own instance (the boot finds its primary ENI); in a pair the
                # other gateway too, and whether EC2 sees it running (the agent's second
                # opinion before a forced detach). No resource-level permissions for these.
                sid="SeeItsEniAndInstances",
                actions=[
                    "ec2:DescribeNetworkInterfaces",
                    "ec2:DescribeInstances",
                    *(["ec2:DescribeInstanceStatus"] if self.pair else []),
                ],
                resources=["*"],
            )
        )
        # Instances of the gateway group, by the tag Auto Scaling sets and no user can.
        in_the_group = {"StringEquals": {f"aws:ResourceTag/{GROUP_NAME_TAG}": self.group_name}}
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")
        eni_arn = stack.format_arn(
            service="ec2", resource="network-interface", resource_name=self.eni.ref
        )
        group_arn = stack.format_arn(
            service="autoscaling",
            resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{self.group_name}",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        # AttachNetworkInterface authorizes the ENI and the instance separately (each resource of
        # a request needs an Allow): G's ENI by its ARN, the instance by its group.
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="AttachTheGatewayEni",
                actions=["ec2:AttachNetworkInterface"],
                resources=[eni_arn],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="AttachToAGatewayOfTheGroup",
                actions=["ec2:AttachNetworkInterface"],
                resources=[instances],
                conditions=in_the_group,
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                # The check goes off on the gateways' primary ENIs, tagged at launch by the
                # launch template (PRIMARY_ENI_TAG): never G's ENI, never the instance
                # attribute, which EC2 refuses once G's ENI is attached. An ENI does not carry
                # aws:autoscaling:groupName (only instances do), so the launch template's tags
                # and G's subnet are what is left. ec2:Attribute is listed for this action in
                # the Service Authorization Reference, but AWS does not document that the
                # request carries it: IfExists, so the boot never depends on it
                # (docs/security.md).
                sid="SourceDestCheckOffOnGateways",
                actions=["ec2:ModifyNetworkInterfaceAttribute"],
                resources=[
                    stack.format_arn(service="ec2", resource="network-interface", resource_name="*")
                ],
                conditions={
                    "StringEquals": {
                        f"aws:ResourceTag/{ROLE_TAG}": ROLE_GATEWAY,
                        f"aws:ResourceTag/{DEPLOYMENT_TAG}": deployment,
                        f"aws:ResourceTag/{PRIMARY_ENI_TAG}": PRIMARY_ENI_VALUE,
                    },
                    "StringEqualsIgnoreCaseIfExists": {"ec2:Attribute": "SourceDestCheck"},
                    "ArnEquals": {
                        "ec2:Subnet": stack.format_arn(
                            service="ec2", resource="subnet", resource_name=subnet.subnet_id
                        )
                    },
                },
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReportBootFailure",
                actions=["autoscaling:SetInstanceHealth"],
                resources=[group_arn],
            )
        )
        self.heartbeat_key: secretsmanager.Secret | None = None
        if self.pair:
            self.heartbeat_key = self._heartbeat_key(deployment)
            self._pair_permissions(
                table, eni_arn, instances, group_arn, failover_topic, failover_topic_key
            )

        # -- launch template and the Auto Scaling group (one gateway, or the pair) -------------
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
                    software_parameter=software.parameter_name,
                    pair=self._pair_config(config, settings, table, failover_topic, software)
                    if self.pair
                    else None,
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
        # Each gateway's primary ENI is tagged at launch (the group propagates its tags to the
        # instance only): the condition of SourceDestCheckOffOnGateways. A launch template's
        # TagSpecifications may name network-interface (EC2 API reference,
        # LaunchTemplateTagSpecificationRequest); CDK writes the instance's and volumes' only.
        eni_tags = [
            {"Key": key, "Value": value}
            for key, value in (
                (ROLE_TAG, ROLE_GATEWAY),
                (DEPLOYMENT_TAG, deployment),
                (PRIMARY_ENI_TAG, PRIMARY_ENI_VALUE),
            )
        ]
        cfn_template = self.launch_template.node.default_child
        assert isinstance(cfn_template, ec2.CfnLaunchTemplate)
        cfn_template.add_property_override(
            "LaunchTemplateData.TagSpecifications",
            [{"ResourceType": "network-interface", "Tags": eni_tags}],
        )
        # Single: replace by terminating first (the ENI can belong to one instance at a time).
        # Pair: both in G's subnet (an ENI never leaves its zone); one replaced at a time, the
        # other keeps (or takes over) the ENI, so a rolling update never leaves the pair empty.
        # A new gateway counts only once its agent signals that it is a ready standby (strongSwan
        # configured, the NAT table at the table's generation): only then does CloudFormation
        # terminate the next old one, whose agent first hands G over (the terminating hook).
        size = 2 if self.pair else 1
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            auto_scaling_group_name=self.group_name,
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnets=[subnet]),
            launch_template=self.launch_template,
            min_capacity=size,
            max_capacity=size,
            desired_capacity=size if self.pair else None,
            health_checks=autoscaling.HealthChecks.ec2(grace_period=Duration.minutes(15)),
            min_healthy_percentage=50 if self.pair else 0,
            max_healthy_percentage=100,
            update_policy=autoscaling.UpdatePolicy.rolling_update(
                max_batch_size=1,
                min_instances_in_service=size - 1,
                **(
                    {"wait_on_resource_signals": True, "pause_time": READY_SIGNAL_TIMEOUT}
                    if self.pair
                    else {}
                ),
            ),
            signals=autoscaling.Signals.wait_for_count(size, timeout=READY_SIGNAL_TIMEOUT)
            if self.pair
            else None,
        )
        cfn_group = self.group.node.default_child
        assert isinstance(cfn_group, autoscaling.CfnAutoScalingGroup)
        self.group_logical_id = cfn_group.logical_id
        if self.pair:
            # Part of the group itself (not a resource after it): the hook is there before
            # CloudFormation terminates any gateway of the group. No notification target: the
            # agent reads its own target lifecycle state from IMDS.
            cfn_group.lifecycle_hook_specification_list = [
                autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
                    lifecycle_hook_name=terminating_hook_name(deployment),
                    lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING",
                    heartbeat_timeout=int(TERMINATING_HOOK_TIMEOUT.to_seconds()),
                    default_result="CONTINUE",
                )
            ]
        if self.pair:
            Annotations.of(self.group).acknowledge_warning(
                "@aws-cdk/aws-autoscaling:desiredCapacitySet",
                "The pair is always two: min = max = desired, so a deployment resetting the "
                "desired size to 2 is what it should do.",
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
        gateway_parameters: dict[str, str] = {
            "PartnerNetworks": ",".join(str(n) for n in config.partner_networks),
            "TableName": table.table_name,
            "Region": Aws.REGION,
            "NatMode": config.nat_mode.value,
            "SharedAddress": str(config.shared_address) if config.shared_address else "none",
            "IpsecBackend": IPSEC_BACKEND,
            "TunnelMss": str(config.tunnel_mss),
        }
        if lanes is not None:
            # Several partners: the verb reads the lanes from the path; the digest changes with
            # any lane, so State Manager re-runs the association (an unchanged path would not).
            gateway_parameters["PartnersPath"] = lanes.path
            gateway_parameters["PartnersDigest"] = lanes.digest
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
        if self.pair:
            # IKE leaves only from G: the standby, without G's ENI, never initiates from its own
            # address (its primary interface may have a public IPv4 of its own).
            tunnel_parameters["LocalAddress"] = str(config.gateway_private_ip)
        # The health agent has its own document and association (stacks/health_agent.py).
        self.association = self._configure_association(
            documents, deployment, "ConfigureGateway", gateway_parameters
        )
        # The PSK's rollout (stacks/psk_rollout.py) sends this one with these parameters.
        if partners is None or lanes is None:
            self.tunnel_association: ssm.CfnAssociation | None = self._configure_association(
                documents, deployment, "ConfigureTunnel", tunnel_parameters
            )
            self.tunnel_associations[settings.tunnel_name] = self.tunnel_association
        else:
            # One association per partner (its own tunnel, files and PSK on the gateway: F2's
            # per-tunnel files), so a change to one partner re-runs that partner's only.
            self.tunnel_association = None
            for partner, lane in zip(partners.partners, lanes.lanes, strict=True):
                parameters = lane_tunnel_parameters(
                    lane, partner, settings, local_id=self.public_ip
                )
                if self.pair:
                    parameters["LocalAddress"] = str(config.gateway_private_ip)
                self.tunnel_associations[lane.name] = self._configure_association(
                    documents,
                    deployment,
                    "ConfigureTunnel",
                    parameters,
                    partner=lane.name,
                )
        if lanes is not None:
            # A new lane is published (its parameter) and its table exists before anything that
            # reads them runs: ConfigureGateway reads every lane and syncs every lane's table.
            for resource in (*lanes.parameters.values(), *lanes.tables.values()):
                self.association.node.add_dependency(resource)
            for name, association in self.tunnel_associations.items():
                association.node.add_dependency(lanes.parameters[name])
        self.software_association = self._install_association(documents, deployment, software)
        # Created (and, on a deploy that changes both, updated) before the other associations,
        # so State Manager is likely to start it first; it promises no order between
        # associations, so each gateway document also installs its own package when missing.
        for other in (self.association, *self.tunnel_associations.values()):
            other.node.add_dependency(self.software_association)
        # The associations exist before any gateway launches: a new gateway is configured as
        # soon as its SSM agent registers, and a pair's gateway can become a ready standby.
        self.group.node.add_dependency(
            self.software_association, self.association, *self.tunnel_associations.values()
        )
        for finding, reason in (
            (
                "Resource::*",
                "cloudwatch:PutMetricData (conditioned on this deployment's namespace), "
                "ec2:DescribeNetworkInterfaces, ec2:DescribeInstances, (pair mode) "
                "ec2:DescribeInstanceStatus and the SSM agent's ssm:UpdateInstanceInformation, "
                "ListAssociations, ListInstanceAssociations, DescribeAssociation, "
                "Get/DescribeDocument, "
                "Update(Instance)AssociationStatus, PutInventory, PutComplianceItems, ssmmessages "
                "and ec2messages have no resource-level permissions the agent could be held to.",
            ),
            (
                f"Resource::{wildcard_arn(self, 'ec2', 'instance/*')}",
                "Gateway instances are created by the Auto Scaling group, so their IDs are "
                "unknown; each statement requires the instance's aws:autoscaling:groupName to be "
                "this gateway group's (a tag no user can set).",
            ),
            (
                f"Resource::{wildcard_arn(self, 'ec2', 'network-interface/*')}",
                "The gateways' primary ENIs are created at launch, so their IDs are unknown; the "
                "statement requires the tags the launch template gives them (gateway role, "
                "deployment, tunnelnat:interface=gateway-primary), which G's ENI does not carry, "
                "and G's subnet.",
            ),
            (
                "Resource::"
                + wildcard_arn(
                    self,
                    "autoscaling",
                    f"autoScalingGroup:*:autoScalingGroupName/{self.group_name}",
                ),
                "The gateway group by its name; only the group's generated UUID is a wildcard.",
            ),
        ):
            acknowledge(self.role, f"AwsSolutions-IAM5[{finding}]", reason)
        self.psk_name = psk_name

    def _pair_permissions(
        self,
        table: dynamodb.ITable,
        eni_arn: str,
        instances: str,
        group_arn: str,
        topic: sns.ITopic | None,
        topic_key: kms.IKey | None,
    ) -> None:
        """What the pair agent calls (PAIR.md): take G's ENI from the other gateway, find the
        other gateway, record readiness and failovers, announce a failover."""
        self.role.add_to_policy(
            iam.PolicyStatement(
                # Force-detach from the silent active (AttachTheGatewayEni then attaches it here):
                # only G's ENI (by its ARN) ...
                sid="TakeTheGatewayEniFromThePeer",
                actions=["ec2:DetachNetworkInterface"],
                resources=[eni_arn],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                # ... and only from a gateway of the group (the tag Auto Scaling sets).
                sid="OnlyFromAGatewayOfTheGroup",
                actions=["ec2:DetachNetworkInterface"],
                resources=[instances],
                conditions={"StringEquals": {f"aws:ResourceTag/{GROUP_NAME_TAG}": self.group_name}},
            )
        )
        assert self.heartbeat_key is not None
        self.role.add_to_policy(
            iam.PolicyStatement(
                # The key of the heartbeats' HMAC: read once at the agent's start, then cached.
                sid="ReadTheHeartbeatKey",
                actions=["secretsmanager:GetSecretValue"],
                resources=[self.heartbeat_key.secret_arn],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                # The terminating hook: the active hands G over, then lets Auto Scaling go on.
                # The group by its name (only its generated UUID is a wildcard).
                sid="CompleteTheTerminatingHook",
                actions=["autoscaling:CompleteLifecycleAction"],
                resources=[group_arn],
            )
        )
        # cloudformation:SignalResource on this stack (the agent's "ready standby" to the
        # rolling update): CDK grants it to the launch template's role with the group's signals.
        self.role.add_to_policy(
            iam.PolicyStatement(
                # Each agent's readiness item, gateway/<instance-id>: a partition of its own.
                sid="ReportPairReadiness",
                actions=["dynamodb:PutItem", "dynamodb:UpdateItem"],
                resources=[table.table_arn],
                conditions={"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [READINESS_PK]}},
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                # meta/pair lives in the controller's meta partition (meta/generation,
                # meta/gateway): UpdateItem only (a PutItem would replace a whole item) and only
                # the pair's attributes, so a gateway can never move the table's generation.
                sid="RecordFailovers",
                actions=["dynamodb:UpdateItem"],
                resources=[table.table_arn],
                conditions={
                    "ForAllValues:StringEquals": {
                        "dynamodb:LeadingKeys": [PAIR_META_PK],
                        "dynamodb:Attributes": list(PAIR_META_ATTRIBUTES),
                    },
                    "StringEqualsIfExists": {
                        "dynamodb:ReturnValues": ["NONE", "UPDATED_OLD", "UPDATED_NEW"]
                    },
                },
            )
        )
        if topic is not None:
            self.role.add_to_policy(
                iam.PolicyStatement(
                    sid="AnnounceFailovers", actions=["sns:Publish"], resources=[topic.topic_arn]
                )
            )
        if topic_key is not None:
            self.role.add_to_policy(
                iam.PolicyStatement(
                    # The topic is encrypted: a publisher needs a data key from its key.
                    sid="EncryptForTheTopic",
                    actions=["kms:GenerateDataKey", "kms:Decrypt"],
                    resources=[topic_key.key_arn],
                )
            )

    def _lock_the_psk(self, secret: secretsmanager.Secret, settings: StackSettings) -> None:
        """The created PSK's resource policy: nobody but the gateways reads it, and (with
        ``psk_writer_arns``) nobody but those principals writes it, however broad their own
        policies (an explicit deny in a resource policy wins: IAM User Guide, Policy evaluation
        logic). The policy actions themselves are left to IAM, so CloudFormation can still
        update this policy."""
        secret.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheGatewaysReadThePsk",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["secretsmanager:GetSecretValue"],
                resources=["*"],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": self.role.role_arn}},
            )
        )
        if settings.psk_writer_arns:
            secret.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="OnlyTheNamedWritersWriteThePsk",
                    effect=iam.Effect.DENY,
                    principals=[iam.AnyPrincipal()],
                    actions=list(PSK_WRITE_ACTIONS),
                    resources=["*"],
                    conditions={"ArnNotLike": {"aws:PrincipalArn": settings.psk_writer_arns}},
                )
            )

    def _heartbeat_key(self, deployment: str) -> secretsmanager.Secret:
        """The heartbeats' HMAC key: generated by Secrets Manager (never in the template), read
        by the gateways' role only. Nothing outlives the pair: a new key is a new pair."""
        key = secretsmanager.Secret(
            self,
            "HeartbeatKey",
            description=f"{deployment}: the gateway pair's heartbeat key (HMAC-SHA256)",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64, exclude_punctuation=True
            ),
            removal_policy=RemovalPolicy.DESTROY,
        )
        # Other principals of the account, however broad their own policies: no read.
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheGatewaysReadTheKey",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["secretsmanager:GetSecretValue"],
                resources=["*"],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": self.role.role_arn}},
            )
        )
        acknowledge(
            key,
            "AwsSolutions-SMG4",
            "Both gateways' agents read the heartbeat key once at start and cache it; a rotated "
            "key would split the pair until both restart. A new key comes with a new pair.",
        )
        return key

    def _pair_config(
        self,
        config: TunnelnatConfig,
        settings: StackSettings,
        table: dynamodb.ITable,
        topic: sns.ITopic | None,
        software: GatewaySoftware,
    ) -> dict[str, object]:
        """pair.json's keys that boot.json does not already say (PAIR.md, issue 20's plan)."""
        assert self.heartbeat_key is not None
        return {
            "deployment": settings.deployment,
            "table": table.table_name,
            "heartbeat_port": HEARTBEAT_PORT,
            "interval_seconds": HEARTBEAT_INTERVAL_SECONDS,
            "misses": HEARTBEAT_MISSES,
            "hold_down_seconds": HOLD_DOWN_SECONDS,
            **self._pair_tunnels(config, settings),
            **({"topic_arn": topic.topic_arn} if topic is not None else {}),
            "namespace": settings.gateway_metric_namespace,
            # The pair's peer is the other member of this group (aws:autoscaling:groupName),
            # never an instance that merely carries tunnelnat:* tags.
            "group_name": self.group_name,
            "key_secret": self.heartbeat_key.secret_arn,
            "lifecycle_hook": terminating_hook_name(settings.deployment),
            "signal_stack": Aws.STACK_NAME,
            # The group is made after the launch template that carries this: its logical ID
            # is filled in at synthesis.
            "signal_resource": Lazy.string(_Later(lambda: self.group_logical_id)),
            # Where the agent reads which package the stack deployed (its readiness says
            # whether it runs that one): a fixed name, so the user data stays the same.
            "software_parameter": software.parameter_name,
        }

    def _pair_tunnels(self, config: TunnelnatConfig, settings: StackSettings) -> dict[str, object]:
        """pair.json's tunnel: the one partner's; with lanes, the first partner's and the
        directory where ConfigureTunnel records every tunnel (the agent reads them there, so
        pair.json does not change when a partner is added or removed)."""
        if self.lanes is None:
            return {
                "tunnel": settings.tunnel_name,
                "children": child_sa_names(
                    settings.tunnel_name,
                    settings.selector_layout,
                    len(config.public_addresses) * len(config.partner_networks),
                ),
            }
        first = self.lanes.lanes[0]
        return {
            "tunnel": first.name,
            "children": child_sa_names(
                first.name,
                self._layouts[first.name],
                len(first.public_addresses) * len(first.networks),
            ),
            "tunnels_dir": TUNNELS_DIR,
        }

    def _install_association(
        self, documents: Documents, deployment: str, software: GatewaySoftware
    ) -> ssm.CfnAssociation:
        """``InstallGatewaySoftware`` on the gateway group's instances, with the package's hash
        and location: a new hash is an UpdateAssociation, which State Manager runs at once
        ("By default, when you update an association, the system runs it immediately after it
        is updated": SSM API reference, UpdateAssociation, ApplyOnlyAtCronInterval), and it
        runs on every instance that joins the targets ("For dynamic targets, such as an AWS
        autoscaling group, State Manager applies the configuration when new managed nodes are
        added to the group": CreateAssociation). One gateway at a time, and none after an
        error: the other gateway of the pair keeps running the package it has. No schedule: the
        package only changes with the parameters, and every gateway document installs the one
        it was synthesized with when it is missing (State Manager has no order between
        associations: docs/gateway-software.md)."""
        return ssm.CfnAssociation(
            self,
            INSTALL_DOCUMENT,
            name=documents.require(INSTALL_DOCUMENT).ref,
            association_name=f"{deployment}-{INSTALL_DOCUMENT}",
            document_version="$DEFAULT",
            targets=gateway_targets(self.group_name),
            parameters=documents.check_parameters(
                INSTALL_DOCUMENT, software.association_parameters
            ),
            compliance_severity="CRITICAL",
            max_concurrency="1",
            max_errors="0",
            apply_only_at_cron_interval=False,
        )

    def _configure_association(
        self,
        documents: Documents,
        deployment: str,
        document: str,
        parameters: dict[str, str],
        *,
        partner: str | None = None,
    ) -> ssm.CfnAssociation:
        """``document`` on the gateway group's instances (``tag:aws:autoscaling:groupName``, which
        no user can set): on each new gateway, on a parameter change, and on a schedule. Two such
        associations run in no set order (docs/stack.md). ``partner``: one partner's association
        of ``document`` (named ``<deployment>-<document>-<partner>``)."""
        suffix = f"-{partner}" if partner is not None else ""
        return ssm.CfnAssociation(
            self,
            f"{document}{suffix}",
            name=documents.require(document).ref,
            association_name=f"{deployment}-{document}{suffix}",
            document_version="$DEFAULT",
            targets=gateway_targets(self.group_name),
            parameters=documents.check_parameters(document, parameters),
            compliance_severity="CRITICAL",
            max_concurrency="1",
            max_errors="1",
            # AWS runs an association when it is created or changed and on each new target; a
            # reboot is not documented to re-run it (the boot units restore the gateway). The
            # schedule is the backstop: drift (a hand edit, a failed first run) is repaired.
            schedule_expression=CONFIGURE_SCHEDULE,
        )


# What the SSM agent calls for Run Command and State Manager (AmazonSSMManagedInstanceCore's
# text, https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AmazonSSMManagedInstanceCore.html,
# less what the gateway never uses: ssm:GetParameter(s) on every parameter (the gateway reads one,
# its software's: GatewaySoftware.statements), GetManifest and PutConfigurePackageResult
# (Distributor), GetDeployablePatchSnapshotForInstance (Patch Manager)).
SSM_AGENT_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ssm:ListAssociations",
    "ssm:ListInstanceAssociations",
    "ssm:DescribeAssociation",
    "ssm:GetDocument",
    "ssm:DescribeDocument",
    "ssm:UpdateAssociationStatus",
    "ssm:UpdateInstanceAssociationStatus",
    "ssm:PutInventory",
    "ssm:PutComplianceItems",
)
# Session Manager's and Run Command's message channels (the same managed policy).
SSM_MESSAGE_ACTIONS = (
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
)
# Writing a secret's value (tunnelnat psk set calls PutSecretValue).
PSK_WRITE_ACTIONS = (
    "secretsmanager:PutSecretValue",
    "secretsmanager:UpdateSecret",
    "secretsmanager:UpdateSecretVersionStage",
    "secretsmanager:RestoreSecret",
    "secretsmanager:DeleteSecret",
)


def ssm_agent_statements() -> list[iam.PolicyStatement]:
    """The SSM agent's own calls, in place of AmazonSSMManagedInstanceCore."""
    return [
        iam.PolicyStatement(sid="SsmAgent", actions=list(SSM_AGENT_ACTIONS), resources=["*"]),
        iam.PolicyStatement(
            sid="SsmAgentMessages", actions=list(SSM_MESSAGE_ACTIONS), resources=["*"]
        ),
    ]


def gateway_targets(group_name: str) -> list[ssm.CfnAssociation.TargetProperty]:
    """State Manager's targets for the gateways: the instances whose aws:autoscaling:groupName
    is the gateway group's. Auto Scaling tags each instance it launches with it, the aws: prefix
    is reserved (no user can set or change it), and associations target any tag key as
    ``tag:<key>`` (Systems Manager User Guide, Running Auto Scaling groups with associations;
    API Target: ``Key=tag:tag-key``)."""
    return [ssm.CfnAssociation.TargetProperty(key=f"tag:{GROUP_NAME_TAG}", values=[group_name])]


@jsii.implements(IStableStringProducer)
class _Later:
    """A string known only later in the synthesis (Lazy.string's producer)."""

    def __init__(self, value: Callable[[], str]) -> None:
        self.value = value

    def produce(self) -> str:
        return self.value()


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


def _packed(text: str) -> str:
    """A file for write_files as gz+b64."""
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


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
    software_parameter: str,
    pair: Mapping[str, object] | None = None,
) -> str:
    """The gateway's cloud-config: packages from the image's archive, the package's installer,
    boot.json (pair.json) and the units of gateway/systemd/ (no AWS CLI anywhere). ``region``
    and ``eni_id`` may be tokens.

    First boot: runcmd installs the gateway software from ``software_parameter`` (the SSM
    parameter naming the package the stack deployed: the user data never names the package, so
    a code change leaves the launch template as it is), then enables the units and attaches the
    ENI; the SSM agent is held until then, so ConfigureGateway never runs on a half-installed
    gateway. Every later boot: systemd runs the units in their order, the agent after
    tunnelnat-boot; the package is the one InstallGatewaySoftware last made current.

    ``pair`` (pair mode): pair.json's own keys (``Gateway._pair_config``); the pair agent's unit
    is installed and started after the boot, and boot.json says ``"pair": true`` (a boot that
    finds the ENI on the other gateway ends as the standby instead of waiting for it).
    """
    boot_config: dict[str, object] = {
        "region": region,
        "eni_id": eni_id,
        "gateway": f"{gateway_ip}/{subnet.prefixlen}",
        "partner_endpoint": str(partner_endpoint),
        "subnet_router": str(subnet.network_address + 1),  # the VPC router: the subnet's .1
    }
    units = BOOT_UNITS
    files = []
    if pair is not None:
        units = (*BOOT_UNITS, PAIR_UNIT)
        # One line: JSON is compact enough, and YAML's literal block keeps it as it is.
        pair_config = {**boot_config, **pair}
        boot_config["pair"] = True
        files.append(("/etc/tunnelnat/pair.json", "0644", "", json.dumps(pair_config)))
    files = [
        ("/etc/tunnelnat/boot.json", "0644", "", json.dumps(boot_config, indent=1)),
        (INSTALLER_PATH, "0755", "gz+b64", _packed(INSTALLER.read_text())),
        (MARKER_PATH, "0755", "gz+b64", _packed(MARKER.read_text())),
        *files,
        *(
            (f"/etc/systemd/system/{unit}", "0644", "", (UNITS_DIR / unit).read_text())
            for unit in units
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
    # No hotplug: G's ENI is the boot's and the pair agent's (CLOUD_INIT_NETWORK_UPDATES).
    out += ["updates:", "  network:", f"    when: [{', '.join(CLOUD_INIT_NETWORK_UPDATES)}]"]
    out.append("write_files:")
    for path, mode, encoding, content in files:
        out += [f"  - path: {path}", f"    permissions: '{mode}'"]
        if encoding:
            out += [f"    encoding: {encoding}", f"    content: {content}"]
        else:
            out += ["    content: |", _literal(content)]
    hold = f"/run/systemd/system/{SSM_AGENT_UNIT}.d"
    # Fetch the package the parameter names, then its own activate verb makes it what the units
    # run (INSTALL_SCRIPT).
    install = ["sh", "-c", f"'{INSTALL_SCRIPT}'", software_parameter, region]
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
        # The package before any unit that runs it (python3-boto3 is installed by now:
        # cloud-init installs packages before runcmd). Verified by its SHA-256, renamed into
        # place, made current: what the units run.
        f"  - [{', '.join(install)}]",
        f"  - [systemctl, enable, {', '.join(units)}]",
        "  - [systemctl, start, tunnelnat-boot.service]",
        *([f"  - [systemctl, start, --no-block, {PAIR_UNIT}]"] if pair is not None else []),
        "  - [touch, /run/tunnelnat-ready]",
        f"  - [systemctl, start, {SSM_AGENT_UNIT}]",
    ]
    return "\n".join(out) + "\n"


def child_sa_names(tunnel: str, layout: str, pairs: int) -> list[str]:
    """The CHILD_SA names ConfigureTunnel gives the connection (core/swanctl.py, Tunnel.children):
    the tunnel's own name, or one per (S, partner network) numbered from 1. The pair agent
    initiates each after taking the ENI over."""
    if layout == "single":
        return [tunnel]
    return [f"{tunnel}-{i}" for i in range(1, pairs + 1)]


def _psk_name(partner: Partner) -> str:
    name = partner.auth.psk_secret
    assert name is not None, "certificates are refused by the settings"
    return name


def lane_tunnel_parameters(
    lane: Lane, partner: Partner, settings: StackSettings, *, local_id: str
) -> dict[str, str]:
    """ConfigureTunnel's parameters for one partner of a partners file: its endpoint, its REAL
    networks (the selectors; an alias is our side's business), its S, its PSK secret and IKE
    settings. ``local_id``: E, unless the partner names ours (``local_id``)."""
    return {
        "PartnerEndpoint": str(lane.endpoint),
        "PartnerNetworks": ",".join(str(n) for n in lane.networks),
        "PublicAddresses": ",".join(str(a) for a in lane.public_addresses),
        "LocalId": partner.local_id or local_id,
        "PskSecretName": _psk_name(partner),
        "Region": Aws.REGION,
        "IpsecBackend": IPSEC_BACKEND,
        "TunnelName": lane.name,
        "IkeVersion": str(lane.ike_version),
        "IkeProposals": ",".join(partner.proposals.ike),
        "EspProposals": ",".join(partner.proposals.esp),
        "IkeLifetimes": ",".join(map(str, partner.lifetimes.ike)),
        "ChildLifetimes": ",".join(map(str, partner.lifetimes.child)),
        "Dpd": f"{partner.dpd.delay},{partner.dpd.timeout}",
        "RemoteId": partner.remote_id or "",
        "SelectorLayout": partner.layout,
        # Not in the partners file: the deployment's keyingtries for every partner.
        "KeyingTries": str(settings.keyingtries),
        "StartAction": partner.start_action,
    }


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
