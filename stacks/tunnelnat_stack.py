"""The whole system in one stack: GatewaySoftware, Documents, Controller, Gateway, HealthAgent,
Monitoring, Healer, PskRollout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import CfnOutput, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

from stacks.controller import Controller
from stacks.documents import Documents
from stacks.enrolment_watch import EnrolmentWatch
from stacks.gateway import Gateway
from stacks.gateway_software import GatewaySoftware
from stacks.healer import Healer
from stacks.health_agent import HealthAgent
from stacks.lanes import Lanes
from stacks.monitoring import Monitoring
from stacks.psk_rollout import PskRollout
from stacks.settings import LOG_RETENTION_DAYS, Settings
from tools.gateway_package import GatewayPackage

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS_DIR = ROOT / "ssm_documents"
LAMBDA_CODE_DIR = ROOT / "lambdas"


class TunnelnatStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        documents_dir: Path = DOCUMENTS_DIR,
        code_dir: Path = LAMBDA_CODE_DIR,
        gateway_package: GatewayPackage | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.settings = settings
        config, stack_settings = settings.config, settings.stack
        self._availability_zone = stack_settings.availability_zone

        vpc, subnet, internet_ready = self._network(settings)
        # A partners file: each partner's table and published lane (stacks/lanes.py); without
        # one, nothing of it exists and every construct below is today's single partner.
        self.lanes = (
            Lanes(self, "Lanes", deployment=stack_settings.deployment, lanes=settings.lanes)
            if settings.lanes
            else None
        )
        tunnels = [lane.name for lane in settings.lanes] or [stack_settings.tunnel_name]
        # The gateway's package (built once per process unless given): every gateway document
        # is bound to it, the associations install it.
        self.software = GatewaySoftware(
            self,
            "GatewaySoftware",
            deployment=stack_settings.deployment,
            package=gateway_package,
        )
        self.documents = Documents(
            self,
            "Documents",
            directory=documents_dir,
            prefix=stack_settings.document_prefix,
            software=self.software,
        )
        self.controller = Controller(
            self,
            "Controller",
            config=config,
            settings=stack_settings,
            documents=self.documents,
            code_directory=code_dir,
            lanes=self.lanes,
        )
        self.monitoring = Monitoring(
            self,
            "Monitoring",
            settings=stack_settings,
            tunnels=tunnels,
            queue=self.controller.queue,
            dead_letter_queue=self.controller.dead_letter_queue,
            function=self.controller.function,
        )
        self.gateway = Gateway(
            self,
            "Gateway",
            config=config,
            settings=stack_settings,
            vpc=vpc,
            subnet=subnet,
            table=self.controller.table,
            documents=self.documents,
            software=self.software,
            internet_ready=internet_ready,
            # A failover is announced on the alarm topic (its subscribers hear of it at once).
            failover_topic=self.monitoring.topic,
            failover_topic_key=self.monitoring.key,
            partners=settings.partners,
            lanes=self.lanes,
        )
        self.health_agent = HealthAgent(
            self,
            "HealthAgent",
            config=config,
            settings=stack_settings,
            documents=self.documents,
            lanes=settings.lanes,
        )
        # After the software's association, as the gateway's own (stacks/gateway.py).
        self.health_agent.association.node.add_dependency(self.gateway.software_association)
        self.controller.serve_gateway(
            vpc_id=vpc.vpc_id,
            gateway_group=self.gateway.group_name,
            enrolment_key=config.enrolment_tag_key,
            gateway_eni_id=self.gateway.eni.ref,
        )
        self.monitoring.watch_gateway(self.gateway.group, pair=stack_settings.gateway_pair)
        self.healer = Healer(
            self,
            "Healer",
            settings=stack_settings,
            tunnel_name=tunnels[0],
            other_tunnels=tunnels[1:],
            table=self.controller.table,
            topic=self.monitoring.topic,
            topic_key=self.monitoring.key,
            documents=self.documents,
            code=self.controller.code,
            powertools=self.controller.powertools,
        )
        self.healer.serve_gateway(
            vpc_id=vpc.vpc_id,
            gateway_group=self.gateway.group_name,
            gateway_ip=str(config.gateway_private_ip),
            gateway_eni_id=self.gateway.eni.ref,
        )
        self.monitoring.add_healer(self.healer.function)
        # Shared-mode partners have no pool (one S): nothing to count.
        self.monitoring.add_partner_pools(
            [lane.name for lane in settings.lanes if lane.shared_address is None]
        )
        if stack_settings.enrolment_role_arn:
            # Opt-in: a page when anyone but the enrolment role tags an instance for enrolment
            # (docs/security.md; needs a CloudTrail trail of management events).
            self.enrolment_watch = EnrolmentWatch(
                self,
                "EnrolmentWatch",
                settings=stack_settings,
                enrolment_key=config.enrolment_tag_key,
                topic=self.monitoring.topic,
                partner_keys=[lane.tag_key for lane in settings.lanes],
            )
        self.psk_rollouts: dict[str, PskRollout] = {}
        if self.gateway.psk is not None and self.gateway.psk_name is not None:
            assert self.gateway.tunnel_association is not None
            self.psk_rollout: PskRollout | None = PskRollout(
                self,
                "PskRollout",
                settings=stack_settings,
                psk=self.gateway.psk,
                psk_name=self.gateway.psk_name,
                association=self.gateway.tunnel_association,
                documents=self.documents,
            )
        else:
            # A partners file: each partner's new PSK re-runs that partner's ConfigureTunnel.
            self.psk_rollout = None
            for name, secret in self.gateway.lane_psks.items():
                association = self.gateway.tunnel_associations[name]
                self.psk_rollouts[name] = PskRollout(
                    self,
                    f"PskRollout-{name}",
                    settings=stack_settings,
                    psk=secret,
                    psk_name=secret.secret_name,
                    association=association,
                    documents=self.documents,
                    # One role for every partner's rollout: the same single permission.
                    role=next(iter(self.psk_rollouts.values())).role if self.psk_rollouts else None,
                )

        CfnOutput(
            self,
            "GatewayPublicIp",
            value=self.gateway.public_ip,
            description="E: give this to the partner as our VPN endpoint",
        )
        CfnOutput(
            self,
            "GatewayPrivateIp",
            value=str(config.gateway_private_ip),
            description="G: enrolled instances route the partner's networks via this",
        )
        if self.gateway.psk_name is not None:
            CfnOutput(
                self,
                "PskSecretName",
                value=self.gateway.psk_name,
                description="put the pre-shared key agreed with the partner here",
            )
        if self.lanes is not None:
            CfnOutput(
                self,
                "PartnersPath",
                value=self.lanes.path,
                description="the lanes (one SSM parameter per partner; core/lanes.py)",
            )
        # What the operator's CLI reads with --stack (STACK_OUTPUTS in cli/tunnelnat_cli/app.py).
        CfnOutput(self, "TableName", value=self.controller.table.table_name)
        CfnOutput(self, "QueueUrl", value=self.controller.queue.queue_url)
        CfnOutput(self, "DeadLetterQueueUrl", value=self.controller.dead_letter_queue.queue_url)
        CfnOutput(self, "ControllerFunctionName", value=self.controller.function.function_name)
        CfnOutput(self, "HealerFunctionName", value=self.healer.function.function_name)
        CfnOutput(self, "AlarmTopicArn", value=self.monitoring.topic.topic_arn)
        CfnOutput(self, "DashboardName", value=self.monitoring.dashboard.dashboard_name)

    @property
    def availability_zones(self) -> list[str]:
        # Explicit AZs keep synthesis free of lookups (which need credentials).
        zone = getattr(self, "_availability_zone", None)
        return [zone] if zone else super().availability_zones

    def _network(self, settings: Settings) -> tuple[ec2.IVpc, ec2.ISubnet, Construct | None]:
        config, stack_settings = settings.config, settings.stack
        if stack_settings.vpc_id and stack_settings.gateway_subnet_id:
            vpc = ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=stack_settings.vpc_id,
                availability_zones=self.availability_zones[:1],
            )
            subnet = ec2.Subnet.from_subnet_attributes(
                self,
                "GatewaySubnet",
                subnet_id=stack_settings.gateway_subnet_id,
                ipv4_cidr_block=str(config.gateway_subnet_cidr),
                availability_zone=stack_settings.availability_zone,
            )
            return vpc, subnet, None
        created = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(str(stack_settings.vpc_cidr)),
            max_azs=1,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="Gateway",
                    subnet_type=ec2.SubnetType.PUBLIC,
                    cidr_mask=config.gateway_subnet_cidr.prefixlen,
                    map_public_ip_on_launch=False,
                ),
                # Where applications live: route-table mode serves it (its route table sends
                # the partner's networks to G's ENI); no NAT, no internet, no SSM needed.
                ec2.SubnetConfiguration(
                    name="Private",
                    subnet_type=ec2.SubnetType.PRIVATE_ISOLATED,
                    cidr_mask=config.gateway_subnet_cidr.prefixlen,
                ),
            ],
            restrict_default_security_group=False,
        )
        if stack_settings.private_subnet_ssm_endpoints:
            # Optional (docs/stack.md, cost): Session Manager and Run Command for the private
            # subnet's instances without a NAT; route-table mode itself never needs them.
            endpoints = ec2.SecurityGroup(
                self,
                "SsmEndpointsSecurityGroup",
                vpc=created,
                description="SSM interface endpoints: HTTPS from the VPC",
                allow_all_outbound=False,
            )
            endpoints.add_ingress_rule(
                ec2.Peer.ipv4(str(stack_settings.vpc_cidr)), ec2.Port.tcp(443), "HTTPS from the VPC"
            )
            for name, service in (
                ("Ssm", ec2.InterfaceVpcEndpointAwsService.SSM),
                ("SsmMessages", ec2.InterfaceVpcEndpointAwsService.SSM_MESSAGES),
                ("Ec2Messages", ec2.InterfaceVpcEndpointAwsService.EC2_MESSAGES),
            ):
                created.add_interface_endpoint(
                    f"{name}Endpoint",
                    service=service,
                    subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED),
                    private_dns_enabled=True,
                    security_groups=[endpoints],
                    open=False,
                )
        created.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(
                logs.LogGroup(
                    self,
                    "FlowLogs",
                    retention=logs.RetentionDays[
                        LOG_RETENTION_DAYS[stack_settings.log_retention_days]
                    ],
                )
            ),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )
        subnet = created.public_subnets[0]
        assert subnet.ipv4_cidr_block == str(config.gateway_subnet_cidr), subnet.ipv4_cidr_block
        # An Elastic IP can be associated only once the internet gateway is attached.
        return created, subnet, created.node.find_child("VPCGW")
