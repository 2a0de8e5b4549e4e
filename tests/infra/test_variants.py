"""An existing VPC and subnet, an imported Elastic IP and PSK, shared mode, a pinned account,
region, AZ and AMI, the single gateway (``tunnelnat:gatewayPair=false``): what changes in the
template (and that it still passes cdk-nag)."""

from __future__ import annotations

import json

import pytest

from tests.infra.conftest import example_context, statements, synthesize

OVERRIDES = {
    "account": "123456789012",
    "region": "eu-west-1",
    "availability_zone": "eu-west-1b",
    "vpc_id": "vpc-0123456789abcdef0",
    "gateway_subnet_id": "subnet-0123456789abcdef0",
    "gateway_subnet_cidr": "10.10.1.0/24",
    "gateway_private_ip": "10.10.1.5",
    "vpc_cidrs": "10.10.0.0/16",
    "gateway_ami_id": "ami-0123456789abcdef0",
    "gateway_instance_type": "c7g.large",
    "gateway_eip_allocation_id": "eipalloc-0123456789abcdef0",
    "gateway_eip_address": "192.0.2.200",
    "psk_secret_name": "partner/psk",
    "nat_mode": "shared",
    "shared_address": "192.0.2.50",
    "address_pool": "",
    "partner_networks": "198.51.100.0/28,198.51.100.64/27",
    "alarm_email": "ops@example.com",
    "deployment": "acme",
    "tunnel_alarm_period_seconds": "10",
    "health_interval_seconds": "10",
    "health_probe_target": "198.51.100.5:443",
    "health_probe_source": "192.0.2.50",
    "healer_max_restarts": "5",
    "healer_backoff_base_seconds": "30",
    "healer_sweep_schedule": "rate(2 minutes)",
    "controller_batch_size": "50",
    "controller_batch_window_seconds": "20",
    "controller_max_attempts": "4",
    "queue_max_receive_count": "6",
    "tunnelnat:gatewayPair": "false",
}


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"), OVERRIDES)


def _configure_gateway(s):
    """ConfigureGateway's association (the health agent has one of its own)."""
    return s.resources("AWS::SSM::Association")[s.logical_id(s.stack.gateway.association)]


def test_existing_vpc_is_used_not_created(s):
    assert not s.resources("AWS::EC2::VPC")
    assert not s.resources("AWS::EC2::Subnet")
    _, asg = s.one("AWS::AutoScaling::AutoScalingGroup")
    assert asg["Properties"]["VPCZoneIdentifier"] == [OVERRIDES["gateway_subnet_id"]]
    _, eni = s.one("AWS::EC2::NetworkInterface")
    assert eni["Properties"]["SubnetId"] == OVERRIDES["gateway_subnet_id"]
    assert eni["Properties"]["PrivateIpAddress"] == OVERRIDES["gateway_private_ip"]
    _, sg = s.one("AWS::EC2::SecurityGroup")
    assert sg["Properties"]["VpcId"] == OVERRIDES["vpc_id"]
    assert any(
        rule["CidrIp"] == "10.10.0.0/16" and rule["IpProtocol"] == "-1"
        for rule in sg["Properties"]["SecurityGroupIngress"]
    ), "route-table mode: the VPC's CIDRs (vpc_cidrs)"


def configure_gateway_association(s):
    """ConfigureGateway's association (the health agent has its own: InstallHealthAgent)."""
    return s.resources("AWS::SSM::Association")[s.logical_id(s.stack.gateway.association)]


def configure_tunnel_association(s):
    """ConfigureTunnel's association: strongSwan's connection and the PSK."""
    return s.resources("AWS::SSM::Association")[s.logical_id(s.stack.gateway.tunnel_association)]


def test_imported_elastic_ip_is_associated_not_allocated(s):
    assert not s.resources("AWS::EC2::EIP")
    _, association = s.one("AWS::EC2::EIPAssociation")
    assert association["Properties"]["AllocationId"] == OVERRIDES["gateway_eip_allocation_id"]
    assert "DependsOn" not in association
    ssm_association = configure_tunnel_association(s)
    params = {k: v[0] for k, v in ssm_association["Properties"]["Parameters"].items()}
    assert params["LocalId"] == OVERRIDES["gateway_eip_address"]


def test_imported_psk_is_read_by_name_and_not_created(s):
    assert not s.resources("AWS::SecretsManager::Secret")
    association = configure_tunnel_association(s)
    assert association["Properties"]["Parameters"]["PskSecretName"] == ["partner/psk"]
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(s.stack.gateway.role.node.find_child("DefaultPolicy"))
    ]
    (read,) = [st for st in statements(policy) if st["Sid"] == "ReadThePsk"]
    # With the region pinned the partition is a literal too (@aws-cdk/core:enablePartitionLiterals).
    assert (
        read["Resource"]
        == "arn:aws:secretsmanager:eu-west-1:123456789012:secret:partner/psk-??????"
    )


def test_shared_mode_parameters_and_controller_config(s):
    association = configure_gateway_association(s)
    params = {k: v[0] for k, v in association["Properties"]["Parameters"].items()}
    assert params["NatMode"] == "shared"
    assert params["SharedAddress"] == "192.0.2.50"
    assert params["PartnerNetworks"] == "198.51.100.0/28,198.51.100.64/27"
    assert association["Properties"]["Targets"] == [
        {"Key": "tag:aws:autoscaling:groupName", "Values": ["acme-gateway"]}
    ]
    tunnel = configure_tunnel_association(s)
    assert tunnel["Properties"]["Parameters"]["PublicAddresses"] == ["192.0.2.50"]
    assert tunnel["Properties"]["Targets"] == association["Properties"]["Targets"]
    function = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.controller.function)]
    config = json.loads(function["Properties"]["Environment"]["Variables"]["TUNNELNAT_CONFIG"])
    assert config["nat_mode"] == "shared"
    assert config["shared_address"] == "192.0.2.50"
    assert config["address_pool"] == []


def test_pinned_region_account_ami_and_arm_instance(s):
    assert s.stack.region == "eu-west-1" and s.stack.account == "123456789012"
    _, lt = s.one("AWS::EC2::LaunchTemplate")
    data = lt["Properties"]["LaunchTemplateData"]
    assert data["ImageId"] == "ami-0123456789abcdef0"
    assert data["InstanceType"] == "c7g.large"
    documents = s.resources("AWS::SSM::Document")
    assert {d["Properties"]["Name"].split("-", 1)[0] for d in documents.values()} == {"acme"}
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(s.stack.controller.role.node.find_child("DefaultPolicy"))
    ]
    (docs,) = [st for st in statements(policy) if st.get("Sid") == "RunOnlyTheDocumentsItSends"]
    assert ":ssm:eu-west-1:123456789012:document/acme-SyncNatTable" in json.dumps(docs["Resource"])


def test_alarm_email_is_subscribed(s):
    _, subscription = s.one("AWS::SNS::Subscription")
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == "ops@example.com"


def test_arm_instance_type_gets_an_arm_image_by_default(tmp_path):
    # Without a pinned AMI the image follows the instance type's architecture.
    overrides = {k: v for k, v in OVERRIDES.items() if k != "gateway_ami_id"}
    from stacks.application import build_app

    _, stack = build_app(example_context(overrides), outdir=str(tmp_path), nag=False)
    # Canonical's parameter for arm64 (a CfnParameter of the stack, resolved at deploy time).
    images = [
        c.default for c in stack.node.children if "canonical" in c.node.id and hasattr(c, "default")
    ]
    assert images == [
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id"
    ]


def test_health_agent_parameters_high_resolution_and_probe(s):
    association = s.resources("AWS::SSM::Association")[
        s.logical_id(s.stack.health_agent.association)
    ]
    params = {k: v[0] for k, v in association["Properties"]["Parameters"].items()}
    assert params["Deployment"] == "acme"
    assert params["HealthInterval"] == "10"
    assert params["ProbeTarget"] == "198.51.100.5:443"
    assert params["ProbeSource"] == "192.0.2.50"
    (alarm,) = [
        a["Properties"]
        for a in s.resources("AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == "TunnelUp"
    ]
    assert alarm["Period"] == 10


def test_healer_and_controller_tuning_from_context(s):
    healer = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.healer.function)]
    env = healer["Properties"]["Environment"]["Variables"]
    assert env["TUNNELNAT_HEALER_MAX_RESTARTS_PER_HOUR"] == "5"
    assert env["TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS"] == "30"
    assert env["TUNNELNAT_HEALER_ALARM_PREFIX"] == "tunnelnat-acme-TunnelUp-"
    assert env["TUNNELNAT_DEPLOYMENT"] == "acme"
    sweep = s.resources("AWS::Events::Rule")[s.logical_id(s.stack.healer.sweep_rule)]
    assert sweep["Properties"]["ScheduleExpression"] == "rate(2 minutes)"
    alarm_rule = s.resources("AWS::Events::Rule")[s.logical_id(s.stack.healer.alarm_rule)]
    assert alarm_rule["Properties"]["EventPattern"]["detail"]["alarmName"] == [
        {"prefix": "tunnelnat-acme-TunnelUp-"}
    ]
    _, mapping = s.one("AWS::Lambda::EventSourceMapping")
    assert mapping["Properties"]["BatchSize"] == 50
    assert mapping["Properties"]["MaximumBatchingWindowInSeconds"] == 20
    controller = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.controller.function)]
    assert controller["Properties"]["Environment"]["Variables"]["TUNNELNAT_MAX_ATTEMPTS"] == "4"
    queue = s.resources("AWS::SQS::Queue")[s.logical_id(s.stack.controller.queue)]
    assert queue["Properties"]["RedrivePolicy"]["maxReceiveCount"] == 6


def test_single_gateway_is_the_group_of_one_as_before_the_pair(s):
    """tunnelnat:gatewayPair=false: exactly the gateway of before issue 15."""
    _, asg = s.one("AWS::AutoScaling::AutoScalingGroup")
    props = asg["Properties"]
    assert (props["MinSize"], props["MaxSize"]) == ("1", "1")
    assert "DesiredCapacity" not in props
    # Terminate before launch: the ENI with G can belong to one instance at a time.
    assert props["InstanceMaintenancePolicy"] == {
        "MinHealthyPercentage": 0,
        "MaxHealthyPercentage": 100,
    }
    rolling = asg["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert (rolling["MaxBatchSize"], rolling["MinInstancesInService"]) == (1, 0)
    # No heartbeat rule, no pair agent (unit, pair.json), no pair permissions; the package and
    # its installer as in the pair.
    assert not s.resources("AWS::EC2::SecurityGroupIngress")
    _, lt = s.one("AWS::EC2::LaunchTemplate")
    user_data = json.dumps(lt["Properties"]["LaunchTemplateData"]["UserData"])
    for text in ("pair.json", "tunnelnat-pair", "tunnelnat_pair", '\\"pair\\"'):
        assert text not in user_data, text
    assert "install_package.py" in user_data
    gateway = s.stack.gateway
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(gateway.role.node.find_child("DefaultPolicy"))
    ]
    by_sid = {st["Sid"]: st for st in statements(policy)}
    assert set(by_sid) == {
        "SsmAgent",
        "SsmAgentMessages",
        "ReadItsTable",
        "ReadThePsk",
        "PutTunnelMetrics",
        "SeeItsEniAndInstances",
        "AttachTheGatewayEni",
        "AttachToAGatewayOfTheGroup",
        "SourceDestCheckOffOnGateways",
        "ReportBootFailure",
        "FetchTheGatewaySoftware",
        "ReadTheDeployedSoftware",
    }
    # The boot finds its primary ENI (issue 20) in single mode too; no pair's calls.
    assert sorted(by_sid["SeeItsEniAndInstances"]["Action"]) == [
        "ec2:DescribeInstances",
        "ec2:DescribeNetworkInterfaces",
    ]
    assert by_sid["SourceDestCheckOffOnGateways"]["Action"] == (
        "ec2:ModifyNetworkInterfaceAttribute"
    )
    # No signals, no hook, no heartbeat key: no agent sends or completes them.
    assert "CreationPolicy" not in asg
    assert "WaitOnResourceSignals" not in rolling
    assert "LifecycleHookSpecificationList" not in props
    assert gateway.heartbeat_key is None
    assert len(s.resources("AWS::SecretsManager::Secret")) == 0  # the PSK is imported here
    assert "updates:" in user_data  # cloud-init's hotplug is off for G's ENI here too
    _, dashboard = s.one("AWS::CloudWatch::Dashboard")
    assert "Failovers" not in json.dumps(dashboard)
    tunnel = s.resources("AWS::SSM::Association")[s.logical_id(gateway.tunnel_association)]
    assert "LocalAddress" not in tunnel["Properties"]["Parameters"]
    # The healer still follows G's ENI: with one gateway, its holder is that gateway.
    assert s.stack.healer.function.node.default_child is not None
