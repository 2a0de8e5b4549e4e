"""The quick-start stack (cdk.json's context): every property issue 3 asks for, asserted.

The default is the gateway pair (issue 15, ``tunnelnat:gatewayPair``); tests/infra/test_variants.py
synthesizes the single gateway (``tunnelnat:gatewayPair=false``) and proves it is as before."""

from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import yaml
from aws_cdk.assertions import Match

from stacks.gateway import (
    BOOT_UNITS,
    CONFIGURE_SCHEDULE,
    GATEWAY_DIR,
    GATEWAY_PACKAGES,
    HEARTBEAT_PORT,
    INSTALL_SCRIPT,
    INSTALLER,
    INSTALLER_PATH,
    MARKER,
    MARKER_PATH,
    PACKAGE_PATH,
    PAIR_META_ATTRIBUTES,
    PAIR_UNIT,
    READY_SIGNAL_TIMEOUT,
    SSM_AGENT_ACTIONS,
    SSM_AGENT_UNIT,
    UNITS_DIR,
    USER_DATA_LIMIT,
    boot_user_data,
)
from tests.infra.conftest import DOCUMENTS_DIR, as_list, example_context, statements, synthesize
from tools.gateway_package import CORE_MODULES
from tunnelnat.events import HOOK_PREFIX

CONTEXT = example_context()
T = CONTEXT["partner_endpoint"]
G = CONTEXT["gateway_private_ip"]
SUBNET = CONTEXT["gateway_subnet_cidr"]
DEPLOYMENT = CONTEXT["deployment"]
# The default deployment's default key (cdk.json gives none: issue 21, each deployment its own).
ENROLMENT_KEY = "tunnelnat"
DOC_FILES = sorted(DOCUMENTS_DIR.glob("*.yaml"))
REQUIREMENTS = DOCUMENTS_DIR.parent / "requirements.txt"
PACKAGE_DIR = GATEWAY_DIR / "tunnelnat_gateway"
SOFTWARE_PARAMETER = f"/tunnelnat/{DEPLOYMENT}/gateway-software"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"))


# -- Gateway ---------------------------------------------------------------------------------


def test_gateway_is_an_auto_scaling_group_of_two_in_the_gateway_subnet(s):
    _, asg = s.one("AWS::AutoScaling::AutoScalingGroup")
    props = asg["Properties"]
    assert (props["MinSize"], props["MaxSize"], props["DesiredCapacity"]) == ("2", "2", "2")
    assert props["HealthCheckType"] == "EC2"
    # Both in G's subnet, so in the ENI's zone: an ENI never moves between zones.
    assert props["VPCZoneIdentifier"] == [s.ref(s.stack.node.find_child("Vpc").public_subnets[0])]
    # One replaced at a time, never both: the other keeps (or takes over) the ENI.
    assert props["InstanceMaintenancePolicy"] == {
        "MinHealthyPercentage": 50,
        "MaxHealthyPercentage": 100,
    }
    rolling = asg["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert (rolling["MaxBatchSize"], rolling["MinInstancesInService"]) == (1, 1)
    tags = {t["Key"]: (t["Value"], t["PropagateAtLaunch"]) for t in props["Tags"]}
    assert tags["tunnelnat:role"] == ("gateway", True)
    assert tags["tunnelnat:deployment"] == (DEPLOYMENT, True)
    assert tags["tunnelnat:gateway"] == (DEPLOYMENT, True)
    # The group launches only once G and E exist, and both configure associations (a new
    # gateway is configured as soon as its SSM agent registers).
    gateway = s.stack.gateway
    assert set(asg["DependsOn"]) >= {
        s.logical_id(gateway.node.find_child("EipAssociation")),
        s.logical_id(gateway.association),
        s.logical_id(gateway.tunnel_association),
    }


def test_a_deploy_waits_for_each_new_gateway_to_be_a_ready_standby(s):
    """Issue 20, defect 3: the rolling update moves on only when the new gateway's agent signals
    that it is a ready standby, and the old active hands G over before it is terminated."""
    group_id, asg = s.one("AWS::AutoScaling::AutoScalingGroup")
    rolling = asg["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert rolling["WaitOnResourceSignals"] is True
    assert rolling["PauseTime"] == "PT20M" == READY_SIGNAL_TIMEOUT.to_iso_string()
    assert asg["CreationPolicy"] == {"ResourceSignal": {"Count": 2, "Timeout": "PT20M"}}
    # Health replacements wait while CloudFormation replaces (CDK's default with signals).
    assert {"HealthCheck", "ReplaceUnhealthy"} <= set(rolling["SuspendProcesses"])
    (hook,) = asg["Properties"]["LifecycleHookSpecificationList"]
    assert hook == {
        "LifecycleHookName": f"gateway-{DEPLOYMENT}-terminating",
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        "HeartbeatTimeout": 300,
        "DefaultResult": "CONTINUE",
    }
    # Not a name the controller's Lifecycle rule takes as its own (it would complete it).
    assert not hook["LifecycleHookName"].startswith(HOOK_PREFIX)
    assert s.stack.gateway.group_logical_id and group_id == s.logical_id(s.stack.gateway.group)


def test_launch_template_ubuntu_2404_imdsv2_encrypted_public_ip(s):
    _, lt = s.one("AWS::EC2::LaunchTemplate")
    data = lt["Properties"]["LaunchTemplateData"]
    image = s.json["Parameters"][data["ImageId"]["Ref"]]
    # Canonical's public parameter, resolved by CloudFormation at deploy time.
    assert image["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert image["Default"] == (
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    )
    # Ubuntu's root device: a wrong name would add a second volume instead.
    assert [b["DeviceName"] for b in data["BlockDeviceMappings"]] == ["/dev/sda1"]
    assert data["InstanceType"] == CONTEXT["gateway_instance_type"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    assert data["Monitoring"] == {"Enabled": True}
    assert all(b["Ebs"]["Encrypted"] for b in data["BlockDeviceMappings"])
    (nic,) = data["NetworkInterfaces"]
    assert nic["AssociatePublicIpAddress"] is True
    assert nic["Groups"] == [
        {"Fn::GetAtt": [s.logical_id(s.stack.gateway.security_group), "GroupId"]}
    ]


def _user_data(s) -> tuple[list, str]:
    _, lt = s.one("AWS::EC2::LaunchTemplate")
    parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    # Tokens stand in with values of their longest deployed length: a long region, an ENI ID,
    # and for the generated names (table, topic, asset bucket) more than CloudFormation makes.
    eni, region = s.ref(s.stack.gateway.eni), {"Ref": "AWS::Region"}
    text = "".join(
        p
        if isinstance(p, str)
        else "ap-southeast-5"
        if p == region
        else "eni-" + "0" * 17
        if p == eni
        else "x" * 128
        for p in parts
    )
    return parts, text


def test_user_data_boots_the_gateway_without_the_aws_cli(s):
    parts, text = _user_data(s)
    assert {"Ref": s.logical_id(s.stack.gateway.eni)} in parts
    assert {"Ref": "AWS::Region"} in parts
    assert len(text.encode()) <= USER_DATA_LIMIT
    data = yaml.safe_load(text)
    # Packages from the image's own archive; no AWS CLI, no curl to AWS, no other source.
    assert data["packages"] == list(GATEWAY_PACKAGES) and data["package_update"] is True
    assert "strongswan" not in data["packages"]  # the metapackage adds a second charon
    assert not re.search(r"(^|[\s\[,'\"])aws\s", text, re.MULTILINE)
    assert "apt_sources" not in data and "snap" not in data
    files = {f["path"]: f for f in data["write_files"]}
    boot = json.loads(files["/etc/tunnelnat/boot.json"]["content"])
    assert boot["gateway"] == f"{G}/{IPv4Network(SUBNET).prefixlen}"
    assert boot["partner_endpoint"] == T
    assert boot["subnet_router"] == str(IPv4Network(SUBNET).network_address + 1)
    assert boot["pair"] is True


def test_user_data_writes_pair_json_and_installs_the_package_before_the_units(s):
    parts, text = _user_data(s)
    data = yaml.safe_load(text)
    files = {f["path"]: f for f in data["write_files"]}
    pair = json.loads(files["/etc/tunnelnat/pair.json"]["content"])
    boot = json.loads(files["/etc/tunnelnat/boot.json"]["content"])
    # PAIR.md's keys and issue 20's, the shared ones as boot.json says them.
    assert set(pair) == {
        "region", "eni_id", "gateway", "deployment", "table", "heartbeat_port",
        "interval_seconds", "misses", "hold_down_seconds", "tunnel", "children", "topic_arn",
        "namespace", "partner_endpoint", "subnet_router",
        "key_secret", "lifecycle_hook", "signal_stack", "signal_resource", "group_name",
        "software_parameter",
    }  # fmt: skip
    assert pair["software_parameter"] == SOFTWARE_PARAMETER
    gateway = s.stack.gateway
    assert pair["lifecycle_hook"] == f"gateway-{DEPLOYMENT}-terminating"
    assert pair["signal_resource"] == s.logical_id(gateway.group)  # a plain string, no token
    for token in (gateway.heartbeat_key, {"Ref": "AWS::StackName"}):
        assert (token if isinstance(token, dict) else s.ref(token)) in parts
    assert {k: pair[k] for k in boot if k != "pair"} == {
        k: v for k, v in boot.items() if k != "pair"
    }
    assert (pair["heartbeat_port"], pair["interval_seconds"], pair["misses"]) == (7465, 0.5, 4)
    # Issue 21: the gateways' own namespace, and the group that makes a peer.
    assert pair["hold_down_seconds"] == 60 and pair["namespace"] == f"tunnelnat/{DEPLOYMENT}"
    assert pair["group_name"] == f"{DEPLOYMENT}-gateway"
    assert pair["deployment"] == DEPLOYMENT
    assert pair["tunnel"] == CONTEXT["tunnel_name"] and pair["children"] == [pair["tunnel"]]
    assert (
        files[f"/etc/systemd/system/{PAIR_UNIT}"]["content"] == (UNITS_DIR / PAIR_UNIT).read_text()
    )
    for token in (s.stack.controller.table, s.stack.monitoring.topic):
        assert s.ref(token) in parts
    # The package (the agent's too): named by the stack's parameter, installed before any unit
    # that runs it is enabled or started.
    (install,) = [c for c in data["runcmd"] if c[0] == "sh"]
    assert install == [
        "sh",
        "-c",
        INSTALL_SCRIPT,
        SOFTWARE_PARAMETER,
        "ap-southeast-5",  # the region's token, as _user_data stands it in
    ]
    enable = ["systemctl", "enable", *BOOT_UNITS, PAIR_UNIT]
    runcmd = data["runcmd"]
    assert runcmd.index(install) < runcmd.index(enable)
    assert runcmd.index(enable) < runcmd.index(["systemctl", "start", "--no-block", PAIR_UNIT])
    # Nothing of the package's own in the user data: not its hash, not its key.
    software = s.stack.software
    assert software.sha256 not in text and software.package.sha256[:16] not in text
    assert "tunnelnat_gateway" not in text


def test_boot_user_data_carries_the_installer_and_the_units():
    text = boot_user_data(
        region="eu-west-1",
        eni_id="eni-0123456789abcdef0",
        gateway_ip=IPv4Network(SUBNET).network_address + 10,
        subnet=IPv4Network(SUBNET),
        partner_endpoint=T,
        software_parameter="/tunnelnat/x/gateway-software",
    )
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    files = {f["path"]: f for f in data["write_files"]}
    # The fetcher as the repository has it (the package itself comes from S3), then the
    # package's activate verb makes it what the units run.
    # A failed install marks the instance Unhealthy: Auto Scaling replaces it.
    assert INSTALL_SCRIPT == (
        f'pkg=$(python3 {INSTALLER_PATH} --parameter "$0" --region "$1") && python3 "$pkg" activate'
        f' || (python3 {MARKER_PATH} "$1" "the gateway software could not be installed"; exit 1)'
    )
    for path, source in ((INSTALLER_PATH, INSTALLER), (MARKER_PATH, MARKER)):
        shipped = files[path]
        assert shipped["encoding"] == "gz+b64" and shipped["permissions"] == "0755"
        assert gzip.decompress(base64.b64decode(shipped["content"])).decode() == source.read_text()
    assert not [f for f in files if f.endswith(".py") and f not in (INSTALLER_PATH, MARKER_PATH)]
    for unit in BOOT_UNITS:
        assert files[f"/etc/systemd/system/{unit}"]["content"] == (UNITS_DIR / unit).read_text()
    drop_in = files[f"/etc/systemd/system/{SSM_AGENT_UNIT}.d/tunnelnat.conf"]["content"]
    assert "After=tunnelnat-boot.service" in drop_in
    config = json.loads(files["/etc/tunnelnat/boot.json"]["content"])
    assert config["eni_id"] == "eni-0123456789abcdef0" and config["region"] == "eu-west-1"
    # First boot: the agent is held (bootcmd) until the units are enabled and the ENI is up.
    ((*hold, script),) = data["bootcmd"]
    assert hold == ["cloud-init-per", "instance", "tunnelnat-hold-ssm-agent", "sh", "-c"]
    assert "ConditionPathExists=/run/tunnelnat-ready" in script
    assert data["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["sh", "-c", INSTALL_SCRIPT, "/tunnelnat/x/gateway-software", "eu-west-1"],
        ["systemctl", "enable", *BOOT_UNITS],
        ["systemctl", "start", "tunnelnat-boot.service"],
        ["touch", "/run/tunnelnat-ready"],
        ["systemctl", "start", SSM_AGENT_UNIT],
    ]
    # cloud-init leaves hot-plugged ENIs alone (issue 20, defect 5): the network events it
    # handles are the first boot's only. cloudinit.readthedocs.io/en/latest/explanation/
    # events.html: the values are boot-new-instance, boot, boot-legacy and hotplug; EC2's
    # datasource adds hotplug by default since cloud-init 24.1 (canonical/cloud-init#4799).
    assert data["updates"] == {"network": {"when": ["boot-new-instance"]}}
    # The restore loads the saved guard with nft before anything of the package runs.
    restore = [
        line.split("=", 1)[1].split()
        for line in (UNITS_DIR / "tunnelnat-restore.service").read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    assert restore == [
        ["nft", "-f", "/etc/tunnelnat/tunnelnat.nft"],
        ["python3", PACKAGE_PATH, "restore"],
    ]


def test_a_code_change_leaves_the_user_data_as_it_is():
    """The launch template never names the package: two packages, one user data (so a code
    change never replaces a gateway; InstallGatewaySoftware upgrades it in place)."""
    from stacks.gateway_software import parameter_name

    texts = {
        boot_user_data(
            region="eu-west-1",
            eni_id="eni-0123456789abcdef0",
            gateway_ip=IPv4Network(SUBNET).network_address + 10,
            subnet=IPv4Network(SUBNET),
            partner_endpoint=T,
            software_parameter=parameter_name(DEPLOYMENT),
            pair={"deployment": DEPLOYMENT, "software_parameter": parameter_name(DEPLOYMENT)},
        )
        for _ in ("one package", "another")
    }
    assert len(texts) == 1


# cloud-init's own schema: unpacked from Debian's cloud-init package by `make deps`
# (.deps/cloud-init, never installed, never fetched by a test), or where this machine has the
# package, or TUNNELNAT_CLOUD_INIT_DIR. (Debian 12's 22.4 schema validates this user data,
# `updates` included.) Under CI a missing schema fails instead of skipping.
CLOUD_INIT_SCHEMAS = [
    Path(p) / "cloudinit/config/schemas/schema-cloud-config-v1.json"
    for p in (
        str(DOCUMENTS_DIR.parent / ".deps/cloud-init/usr/lib/python3/dist-packages"),
        "/usr/lib/python3/dist-packages",
        *(os.environ.get("TUNNELNAT_CLOUD_INIT_DIR") or "").split(os.pathsep),
    )
    if p
]


def test_user_data_is_valid_cloud_config_for_cloud_init_s_schema(s):
    schema_file = next((p for p in CLOUD_INIT_SCHEMAS if p.exists()), None)
    if schema_file is None:
        assert not os.environ.get("CI"), "make deps unpacks cloud-init's schema into .deps"
        pytest.skip("cloud-init's schema is not installed here (the keys are tested above)")
    import jsonschema

    schema = json.loads(schema_file.read_text())
    _, text = _user_data(s)
    data = yaml.safe_load(text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors
    # The schema knows `updates`, and would refuse an unknown event.
    bad = {**data, "updates": {"network": {"when": ["sometimes"]}}}
    assert list(validator.iter_errors(bad))


def test_the_lab_installs_the_gateways_packages():
    makefile = (DOCUMENTS_DIR.parent / "Makefile").read_text()
    (line,) = [x for x in makefile.splitlines() if x.startswith("GATEWAY_PACKAGES :=")]
    assert tuple(line.split(":=", 1)[1].split()) == GATEWAY_PACKAGES
    assert re.search(r"^APT_PACKAGES := \$\(GATEWAY_PACKAGES\) ", makefile, re.MULTILINE)


def test_source_dest_check_off_on_the_standalone_eni_with_the_fixed_ip(s):
    _, eni = s.one("AWS::EC2::NetworkInterface")
    props = eni["Properties"]
    assert props["PrivateIpAddress"] == G
    assert props["SourceDestCheck"] is False
    assert props["SubnetId"] == s.ref(s.stack.node.find_child("Vpc").public_subnets[0])
    assert props["GroupSet"] == [
        {"Fn::GetAtt": [s.logical_id(s.stack.gateway.security_group), "GroupId"]}
    ]
    tags = {t["Key"]: t["Value"] for t in props["Tags"]}
    assert tags["tunnelnat:role"] == "gateway"
    assert tags["tunnelnat:deployment"] == DEPLOYMENT


def test_elastic_ip_e_is_retained_and_associated_with_the_eni_not_an_instance(s):
    eip_id, eip = s.one("AWS::EC2::EIP")
    assert eip["Properties"]["Domain"] == "vpc"
    assert eip["DeletionPolicy"] == "Retain"
    _, association = s.one("AWS::EC2::EIPAssociation")
    assert association["Properties"] == {
        "AllocationId": {"Fn::GetAtt": [eip_id, "AllocationId"]},
        "NetworkInterfaceId": {"Ref": s.logical_id(s.stack.gateway.eni)},
        "PrivateIpAddress": G,
    }
    # The VPC must have its internet gateway before an EIP can be associated.
    assert any("VPCGW" in d for d in association["DependsOn"])
    assert s.json["Outputs"]["GatewayPublicIp"]["Value"] == {"Fn::GetAtt": [eip_id, "PublicIp"]}


def test_security_group_admits_ike_and_esp_from_the_partner_only(s):
    _, sg = s.one("AWS::EC2::SecurityGroup")
    ingress = {
        (r["IpProtocol"], r.get("FromPort"), r.get("ToPort"), r["CidrIp"])
        for r in sg["Properties"]["SecurityGroupIngress"]
    }
    assert ingress == {
        ("udp", 500, 500, f"{T}/32"),
        ("udp", 4500, 4500, f"{T}/32"),
        ("50", None, None, f"{T}/32"),
        # Route-table mode: forwarded packets from the whole VPC (nftables: enrolled only).
        ("-1", None, None, CONTEXT["vpc_cidr"]),
    }
    # The pair's heartbeat (UDP 7465) and the standby's echo request to the active: from the
    # group itself (the two gateways), nothing else.
    sg_id = s.logical_id(s.stack.gateway.security_group)
    rules = [r["Properties"] for r in s.resources("AWS::EC2::SecurityGroupIngress").values()]
    assert {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules} == {
        ("udp", HEARTBEAT_PORT, HEARTBEAT_PORT),
        ("icmp", 8, -1),  # echo request, any code
    }
    for rule in rules:
        assert rule["GroupId"] == {"Fn::GetAtt": [sg_id, "GroupId"]}
        assert rule["SourceSecurityGroupId"] == {"Fn::GetAtt": [sg_id, "GroupId"]}


def test_gateway_role_ssm_agent_plus_exactly_what_the_gateway_needs(s):
    """Issue 21: no AmazonSSMManagedInstanceCore (its ssm:GetParameter* on *), the agent's own
    actions inline; every instance condition names the group (aws:autoscaling:groupName), G's
    ENI its ARN (tests/infra/test_least_privilege.py evaluates them)."""
    gateway = s.stack.gateway
    _, role = next(
        (k, v) for k, v in s.resources("AWS::IAM::Role").items() if k == s.logical_id(gateway.role)
    )
    assert "ManagedPolicyArns" not in role["Properties"]
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(gateway.role.node.find_child("DefaultPolicy"))
    ]
    # CDK's own grant with the group's signals (the agent's SignalResource): this stack only.
    (signal,) = [st for st in statements(policy) if "Sid" not in st]
    assert signal == {
        "Action": "cloudformation:SignalResource",
        "Effect": "Allow",
        "Resource": {"Ref": "AWS::StackId"},
    }
    by_sid = {st["Sid"]: st for st in statements(policy) if "Sid" in st}
    table = s.stack.controller.table
    assert by_sid["ReadItsTable"]["Action"] == ["dynamodb:GetItem", "dynamodb:Query"]
    assert by_sid["ReadItsTable"]["Resource"] == s.arn(table)
    assert by_sid["ReadThePsk"]["Action"] == "secretsmanager:GetSecretValue"
    assert by_sid["ReadThePsk"]["Resource"] == s.ref(gateway.psk)
    assert by_sid["PutTunnelMetrics"]["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": f"tunnelnat/{DEPLOYMENT}"}
    }
    group = {"StringEquals": {"aws:ResourceTag/aws:autoscaling:groupName": f"{DEPLOYMENT}-gateway"}}
    for sid in ("AttachToAGatewayOfTheGroup", "OnlyFromAGatewayOfTheGroup"):
        assert by_sid[sid]["Condition"] == group, sid
        assert by_sid[sid]["Resource"] == {
            "Fn::Join": [
                "",
                [
                    "arn:",
                    {"Ref": "AWS::Partition"},
                    ":ec2:",
                    {"Ref": "AWS::Region"},
                    ":",
                    {"Ref": "AWS::AccountId"},
                    ":instance/*",
                ],
            ]
        }
    for sid in ("AttachTheGatewayEni", "TakeTheGatewayEniFromThePeer"):
        assert "Condition" not in by_sid[sid]
        assert s.logical_id(gateway.eni) in json.dumps(by_sid[sid]["Resource"])
    for sid in ("ReportBootFailure", "CompleteTheTerminatingHook"):
        assert "Condition" not in by_sid[sid]
        assert f"autoScalingGroupName/{DEPLOYMENT}-gateway" in json.dumps(by_sid[sid]["Resource"])
    # SSM parameters: the one naming the deployed software, read only.
    software = s.stack.software
    read = by_sid["ReadTheDeployedSoftware"]
    assert read["Action"] == "ssm:GetParameter"
    assert read["Resource"] == s.stack.resolve(software.parameter_arn)
    assert SOFTWARE_PARAMETER.removeprefix("/") in json.dumps(read["Resource"])
    fetch = by_sid["FetchTheGatewaySoftware"]
    assert fetch["Action"] == "s3:GetObject"
    assert fetch["Resource"] == s.stack.resolve(
        software.asset.bucket.arn_for_objects(software.asset.s3_object_key)
    )
    assert software.asset.s3_object_key in json.dumps(fetch["Resource"])
    # The source/destination check: the primary ENIs the launch template tags, never G's ENI
    # (it lacks tunnelnat:interface) and never the instance attribute (issue 20, defect 1).
    check = by_sid["SourceDestCheckOffOnGateways"]
    assert check["Action"] == "ec2:ModifyNetworkInterfaceAttribute"
    assert check["Condition"]["StringEquals"] == {
        "aws:ResourceTag/tunnelnat:role": "gateway",
        "aws:ResourceTag/tunnelnat:deployment": DEPLOYMENT,
        "aws:ResourceTag/tunnelnat:interface": "gateway-primary",
    }
    assert check["Condition"]["StringEqualsIgnoreCaseIfExists"] == {
        "ec2:Attribute": "SourceDestCheck"
    }
    assert "network-interface/*" in json.dumps(check["Resource"])
    _, lt = s.one("AWS::EC2::LaunchTemplate")
    (spec,) = lt["Properties"]["LaunchTemplateData"]["TagSpecifications"]
    assert spec["ResourceType"] == "network-interface"
    assert {t["Key"]: t["Value"] for t in spec["Tags"]} == {
        "tunnelnat:role": "gateway",
        "tunnelnat:deployment": DEPLOYMENT,
        "tunnelnat:interface": "gateway-primary",
    }
    _, eni_props = s.one("AWS::EC2::NetworkInterface")
    assert "tunnelnat:interface" not in json.dumps(eni_props)
    assert sorted(by_sid["SeeItsEniAndInstances"]["Action"]) == [
        "ec2:DescribeInstanceStatus",
        "ec2:DescribeInstances",
        "ec2:DescribeNetworkInterfaces",
    ]
    # The heartbeat key: its secret only; the deploy's signal: this stack only.
    assert by_sid["ReadTheHeartbeatKey"]["Action"] == "secretsmanager:GetSecretValue"
    assert by_sid["ReadTheHeartbeatKey"]["Resource"] == s.ref(gateway.heartbeat_key)
    assert by_sid["CompleteTheTerminatingHook"]["Action"] == "autoscaling:CompleteLifecycleAction"
    assert by_sid["TakeTheGatewayEniFromThePeer"]["Action"] == "ec2:DetachNetworkInterface"
    assert set(by_sid) == {
        "SsmAgent",
        "SsmAgentMessages",
        "ReadItsTable",
        "ReadThePsk",
        "DecryptThePsk",
        "PutTunnelMetrics",
        "SeeItsEniAndInstances",
        "AttachTheGatewayEni",
        "AttachToAGatewayOfTheGroup",
        "SourceDestCheckOffOnGateways",
        "ReportBootFailure",
        # The pair agent's (PAIR.md, issue 20).
        "TakeTheGatewayEniFromThePeer",
        "OnlyFromAGatewayOfTheGroup",
        "ReadTheHeartbeatKey",
        "CompleteTheTerminatingHook",
        "ReportPairReadiness",
        "RecordFailovers",
        "AnnounceFailovers",
        "EncryptForTheTopic",
        # The gateway software (issue 22): its object, its parameter.
        "FetchTheGatewaySoftware",
        "ReadTheDeployedSoftware",
    }
    # Table writes: only the pair's items. Its own partition for readiness; in the meta
    # partition (the controller's generation lives there) UpdateItem of the pair's attributes.
    assert by_sid["ReportPairReadiness"]["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["gateway"]}
    }
    record = by_sid["RecordFailovers"]
    assert record["Action"] == "dynamodb:UpdateItem"
    assert record["Condition"]["ForAllValues:StringEquals"] == {
        "dynamodb:LeadingKeys": ["meta"],
        "dynamodb:Attributes": list(PAIR_META_ATTRIBUTES),
    }
    writes = [
        st
        for st in by_sid.values()
        if any(a.startswith("dynamodb:") for a in as_list(st["Action"]))
    ]
    assert all(
        "dynamodb:LeadingKeys" in json.dumps(st.get("Condition", {}))
        for st in writes
        if st["Sid"] != "ReadItsTable"
    )
    assert by_sid["AnnounceFailovers"]["Resource"] == s.ref(s.stack.monitoring.topic)
    assert by_sid["EncryptForTheTopic"]["Resource"] == s.arn(s.stack.monitoring.key)
    # No SSM beyond the agent's own calls, no other write.
    actions = {a for st in by_sid.values() for a in as_list(st["Action"])}
    assert {a for a in actions if a.startswith("ssm:")} == {*SSM_AGENT_ACTIONS, "ssm:GetParameter"}
    assert {a for a in actions if a.startswith("s3:")} == {"s3:GetObject"}
    assert {a for a in actions if a.startswith("dynamodb:")} == {
        "dynamodb:GetItem",
        "dynamodb:Query",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
    }


def test_pair_agent_writes_only_the_attributes_the_role_allows():
    """What the pair agent writes into meta/pair, read from its source, is within
    PAIR_META_ATTRIBUTES (the role's dynamodb:Attributes condition would deny anything else)."""
    source = (PACKAGE_DIR / "pair.py").read_text()
    expressions = re.findall(r'UpdateExpression="([^"]+)"(?:\s*"([^"]+)")?', source)
    assert expressions, "the pair agent's UpdateItem calls were not found"
    written = set()
    for parts in expressions:
        text = " ".join(parts)
        written |= set(re.findall(r"(?:SET|,|ADD)\s+([a-z_]+)\s*(?:=|:)", text))
        written |= set(re.findall(r"if_not_exists\(([a-z_]+)", text))
    assert written and written <= set(PAIR_META_ATTRIBUTES), written


def test_gateway_role_allows_every_call_of_the_boot_program_and_the_sync(s):
    """What the boot, the sync, the pair agent and the installer call, read from their source,
    is what the role allows (IMDS needs no permission)."""
    gateway = s.stack.gateway
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(gateway.role.node.find_child("DefaultPolicy"))
    ]
    allowed = {a for st in statements(policy) for a in as_list(st["Action"])}
    calls = set()
    pair_clients = ("ec2", "autoscaling", "dynamodb", "cloudwatch", "sns", "cloudformation")
    for path, clients in (
        (PACKAGE_DIR / "boot.py", {"ec2": "ec2", "autoscaling": "autoscaling"}),
        (PACKAGE_DIR / "nat_sync.py", {"client": "dynamodb"}),
        (PACKAGE_DIR / "pair.py", {**{c: c for c in pair_clients}, "secrets()": "secretsmanager"}),
    ):
        found = re.findall(
            r"\b(ec2|autoscaling|client|dynamodb|cloudwatch|sns|cloudformation|secrets\(\))"
            r"\.([a-z_]+)\(",
            path.read_text(),
        )
        for client, op in found:
            if client not in clients:
                continue
            if op == "get_paginator":
                continue
            calls.add(f"{clients[client]}:" + "".join(w.title() for w in op.split("_")))
    calls.add("dynamodb:Query")  # through get_paginator("query")
    # The installer (user data, documents): the package's object, the stack's parameter.
    installer = INSTALLER.read_text()
    assert "s3.get_object(" in installer and "ssm.get_parameter(" in installer
    calls |= {"s3:GetObject", "ssm:GetParameter"}
    assert calls == {
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeInstances",  # the boot's own instance and the ENI's holder; the peers
        "ec2:ModifyNetworkInterfaceAttribute",  # the primary ENI's check, never the instance's
        "ec2:AttachNetworkInterface",
        "autoscaling:SetInstanceHealth",  # a failed boot; a fenced old active
        "dynamodb:GetItem",
        "dynamodb:Query",
        # The pair agent's own.
        "ec2:DetachNetworkInterface",
        "ec2:DescribeInstanceStatus",  # the second opinion before a forced detach
        "secretsmanager:GetSecretValue",  # the heartbeat key
        "autoscaling:CompleteLifecycleAction",  # the terminating hook, after the handover
        "cloudformation:SignalResource",  # a ready standby, to the rolling update
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "cloudwatch:PutMetricData",
        "sns:Publish",
        "s3:GetObject",
        "ssm:GetParameter",
    }, calls
    assert calls <= allowed, calls - allowed


def test_psk_is_generated_by_secrets_manager_never_in_the_template(s):
    secrets = s.resources("AWS::SecretsManager::Secret")
    secret = secrets[s.logical_id(s.stack.gateway.psk)]
    assert "GenerateSecretString" in secret["Properties"]
    assert "SecretString" not in secret["Properties"]
    assert secret["DeletionPolicy"] == "Retain"


def test_the_heartbeat_key_is_generated_and_only_the_gateways_read_it(s):
    gateway = s.stack.gateway
    key_id = s.logical_id(gateway.heartbeat_key)
    key = s.resources("AWS::SecretsManager::Secret")[key_id]
    generated = key["Properties"]["GenerateSecretString"]
    assert generated["PasswordLength"] >= 32 and "SecretString" not in key["Properties"]
    (policy,) = [
        p
        for p in s.resources("AWS::SecretsManager::ResourcePolicy").values()
        if p["Properties"]["SecretId"] == {"Ref": key_id}
    ]
    (deny,) = policy["Properties"]["ResourcePolicy"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Action"] == "secretsmanager:GetSecretValue"
    assert deny["Condition"] == {
        "ArnNotEquals": {"aws:PrincipalArn": s.arn(gateway.role)},
    }


def test_configure_associations_target_the_gateway_group(s):
    """ConfigureGateway (NAT, guard, forwarding) and ConfigureTunnel (strongSwan, PSK): two
    associations with the same targets and schedule, each given only its own parameters."""
    found = s.resources("AWS::SSM::Association")
    gateway = found[s.logical_id(s.stack.gateway.association)]["Properties"]
    tunnel = found[s.logical_id(s.stack.gateway.tunnel_association)]["Properties"]
    for props, stem in ((gateway, "ConfigureGateway"), (tunnel, "ConfigureTunnel")):
        assert props["Name"] == {"Ref": s.logical_id(s.stack.documents.resources[stem])}
        assert props["AssociationName"] == f"{DEPLOYMENT}-{stem}"
        # Issue 21, finding 1: the group's members by the tag Auto Scaling sets, never a
        # tunnelnat:* tag anyone may put on any instance.
        assert props["Targets"] == [
            {"Key": "tag:aws:autoscaling:groupName", "Values": [f"{DEPLOYMENT}-gateway"]}
        ]
        assert props["DocumentVersion"] == "$DEFAULT"
        # Re-applied on a schedule as well as on new gateways and changes (docs/stack.md).
        assert props["ScheduleExpression"] == CONFIGURE_SCHEDULE == "rate(30 minutes)"
        assert props["ComplianceSeverity"] == "CRITICAL"
    params = {k: v[0] for k, v in gateway["Parameters"].items()}
    assert params == {
        "PartnerNetworks": ",".join(CONTEXT["partner_networks"]),
        "NatMode": "dedicated",
        "SharedAddress": "none",
        "IpsecBackend": "kernel",
        "TunnelMss": str(CONTEXT["tunnel_mss"]),
        "Region": {"Ref": "AWS::Region"},
        "TableName": s.ref(s.stack.controller.table),
    }
    params = {k: v[0] for k, v in tunnel["Parameters"].items()}
    assert params["PartnerEndpoint"] == T
    assert params["PartnerNetworks"] == ",".join(CONTEXT["partner_networks"])
    assert params["PublicAddresses"] == ",".join(CONTEXT["address_pool"])
    assert params["IpsecBackend"] == "kernel"
    assert params["TunnelName"] == CONTEXT["tunnel_name"]
    assert params["Region"] == {"Ref": "AWS::Region"}
    # The pair (the default): IKE only from G, so the standby never initiates.
    assert params["LocalAddress"] == G
    assert params["LocalId"] == {"Fn::GetAtt": [s.one("AWS::EC2::EIP")[0], "PublicIp"]}
    assert "Fn::Select" in json.dumps(params["PskSecretName"])  # the name, from the secret's ARN
    assert not {"TableName", "NatMode", "SharedAddress", "TunnelMss"} & set(params)
    # The health agent is InstallHealthAgent's (its own association: tests/infra/test_documents.py).
    for props in (gateway, tunnel):
        assert not {"Deployment", "HealthInterval", "ProbeTarget", "ProbeSource"} & set(
            props["Parameters"]
        )


# -- The gateway software (issue 22) ----------------------------------------------------------


def _association(s, construct) -> dict:
    return s.resources("AWS::SSM::Association")[s.logical_id(construct)]["Properties"]


def _parameter_value(s) -> str:
    """The software parameter's JSON with the bucket's and region's tokens stood in for."""
    (prop,) = [
        p["Properties"]
        for p in s.resources("AWS::SSM::Parameter").values()
        if p["Properties"]["Name"] == SOFTWARE_PARAMETER
    ]
    parts = prop["Value"]["Fn::Join"][1]
    return "".join(p if isinstance(p, str) else "TOKEN" for p in parts)


def test_the_package_is_an_asset_and_the_parameter_names_it(s):
    software = s.stack.software
    package = software.package
    # The staged asset is the built archive, byte for byte; its key is the asset's.
    key = software.asset.s3_object_key
    assert key.endswith(".pyz")
    staged = s.outdir / f"asset.{key}"
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == package.sha256 == software.sha256
    value = json.loads(_parameter_value(s))
    assert value == {
        "sha256": package.sha256,
        "version": package.version,
        "bucket": "TOKEN",
        "key": key,
        "region": "TOKEN",
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{12}", package.version)


def test_install_gateway_software_runs_on_every_gateway_one_at_a_time(s):
    software = s.stack.software
    props = _association(s, s.stack.gateway.software_association)
    document = s.stack.documents.resources["InstallGatewaySoftware"]
    assert props["Name"] == {"Ref": s.logical_id(document)}
    assert props["AssociationName"] == f"{DEPLOYMENT}-InstallGatewaySoftware"
    assert props["Targets"] == [
        {"Key": "tag:aws:autoscaling:groupName", "Values": [f"{DEPLOYMENT}-gateway"]}
    ]
    params = {k: v[0] for k, v in props["Parameters"].items()}
    assert params == {
        "Sha256": software.sha256,
        "Bucket": s.stack.resolve(software.asset.s3_bucket_name),
        "Key": software.asset.s3_object_key,
        "Region": {"Ref": "AWS::Region"},
    }
    # One gateway at a time, none after a failure (the other keeps its package); run at once on
    # a parameter change and on each new gateway, never only at a schedule.
    assert (props["MaxConcurrency"], props["MaxErrors"]) == ("1", "0")
    assert props["ApplyOnlyAtCronInterval"] is False and "ScheduleExpression" not in props
    # It exists before any gateway launches.
    group = s.json["Resources"][s.logical_id(s.stack.gateway.group)]
    assert s.logical_id(s.stack.gateway.software_association) in group["DependsOn"]
    # The other associations come after it (State Manager promises no order between them: each
    # gateway document installs its own package when missing).
    for other in (
        s.stack.gateway.association,
        s.stack.gateway.tunnel_association,
        s.stack.health_agent.association,
    ):
        depends = s.json["Resources"][s.logical_id(other)]["DependsOn"]
        assert s.logical_id(s.stack.gateway.software_association) in depends


def test_every_gateway_document_is_bound_to_the_shipped_package(s):
    software = s.stack.software
    documents = s.stack.documents
    assert documents.gateway_documents >= {"InstallGatewaySoftware"}
    assert not documents.gateway_documents & {"AddHostRoute", "RemoveHostRoute"}
    for stem in documents.gateway_documents - {"InstallGatewaySoftware"}:
        deployed = json.dumps(
            s.json["Resources"][s.logical_id(documents.resources[stem])]["Properties"]["Content"]
        )
        assert f"pkg_sha256={software.sha256}" in deployed, stem
        assert json.dumps(s.stack.resolve(software.asset.s3_bucket_name)) in deployed, stem
        assert software.asset.s3_object_key in deployed, stem


def test_the_lambda_asset_carries_no_cli(s):
    function = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.controller.function)]
    staged = s.outdir / f"asset.{function['Properties']['Code']['S3Key'].removesuffix('.zip')}"
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "tunnelnat/controller.py" in files and "tunnelnat/core/nat.py" in files
    assert not [f for f in files if "cli" in f.split("/")[:2] or "tunnelnat_cli" in f]
    assert not [f for f in files if "tunnelnat_gateway" in f]


def test_the_gateway_archive_carries_the_gateway_code_only(s):
    """tunnelnat_gateway and the pure core modules it imports: no Lambda code, no CLI; standard
    library and the image's boto3 only."""
    import sys
    import zipfile

    with zipfile.ZipFile(s.stack.software.package.path) as archive:
        names = archive.namelist()
        sources = {n: archive.read(n).decode() for n in names if n.endswith(".py")}
    others = {n for n in names if not n.startswith("tunnelnat_gateway/")}
    assert others == {
        "__main__.py",
        "tunnelnat/__init__.py",
        "tunnelnat/core/__init__.py",
        "tunnelnat/core/lanes.py",  # the lanes ConfigureGateway reads (issue 23)
        "tunnelnat/core/nat.py",
        "tunnelnat/core/swanctl.py",
    }
    assert "tunnelnat_gateway/_build.json" in names
    assert {f"tunnelnat_gateway/{p.name}" for p in PACKAGE_DIR.glob("*.py")} <= set(names)
    imported: set[str] = set()
    for source in sources.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) <= {
        "boto3",
        "botocore",
        "tunnelnat",
        "tunnelnat_gateway",
    }
    # Of tunnelnat, only what the archive carries.
    carried = {"tunnelnat.core"} | {
        "tunnelnat." + m.removesuffix(".py").replace("/", ".")
        for m in CORE_MODULES
        if not m.endswith("__init__.py")
    }
    for source in sources.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunnelnat."):
                assert node.module in carried, node.module


def _copy_gateway_sources(root: Path) -> None:
    """What tools.gateway_package.build reads, under ``root``."""
    import shutil

    repo = DOCUMENTS_DIR.parent
    shutil.copytree(
        repo / "gateway" / "tunnelnat_gateway",
        root / "gateway" / "tunnelnat_gateway",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in CORE_MODULES:
        target = root / "lambdas" / "tunnelnat" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / "lambdas" / "tunnelnat" / name, target)
    shutil.copyfile(repo / "pyproject.toml", root / "pyproject.toml")


def test_one_line_of_gateway_code_changed_is_a_new_hash_and_the_same_launch_template(
    s, tmp_path_factory
):
    """Issue 22, done when: one line of gateway code changed gives a new hash in the template
    (the association's Sha256, so State Manager runs it again on every gateway, and the software
    parameter), and leaves the launch template's user data as it was (no gateway replaced)."""
    from tools.gateway_package import build

    root = tmp_path_factory.mktemp("changed-sources")
    _copy_gateway_sources(root)
    software = root / "gateway" / "tunnelnat_gateway" / "software.py"
    software.write_text(
        software.read_text().replace('SOURCE_VERSION = "source"', 'SOURCE_VERSION = "source!"')
    )
    changed = build(root / "out", root=root)
    assert changed.sha256 != s.stack.software.sha256
    other = synthesize(tmp_path_factory.mktemp("cdk.out-changed"), gateway_package=changed)
    before = _association(s, s.stack.gateway.software_association)["Parameters"]
    after = _association(other, other.stack.gateway.software_association)["Parameters"]
    assert before["Sha256"] == [s.stack.software.sha256] and after["Sha256"] == [changed.sha256]
    assert before["Key"] != after["Key"]
    assert json.loads(_parameter_value(other))["sha256"] == changed.sha256
    assert _parameter_value(other) != _parameter_value(s)
    # The documents carry the new hash (a new version of each gateway document) ...
    stem = "InstallGatewaySoftware"
    assert s.stack.documents.gateway_documents == other.stack.documents.gateway_documents
    for name in s.stack.documents.gateway_documents - {stem}:
        doc = json.dumps(
            other.json["Resources"][other.logical_id(other.stack.documents.resources[name])]
        )
        assert changed.sha256 in doc and s.stack.software.sha256 not in doc, name
    # ... and the launch template is the same: no gateway is replaced for a code change.
    (_, lt_before), (_, lt_after) = (
        s.one("AWS::EC2::LaunchTemplate"),
        other.one("AWS::EC2::LaunchTemplate"),
    )
    assert lt_before == lt_after


# -- Documents -------------------------------------------------------------------------------


def test_one_document_per_yaml_file_with_the_files_content(s):
    documents = s.resources("AWS::SSM::Document")
    assert len(documents) == len(DOC_FILES)
    by_name = {d["Properties"]["Name"]: d["Properties"] for d in documents.values()}
    software = s.stack.software
    for path in DOC_FILES:
        props = by_name[f"{DEPLOYMENT}-{path.stem}"]
        # The file's content, with the package's placeholders bound to the shipped package.
        content = yaml.safe_load(path.read_text())
        assert props["Content"] == s.stack.resolve(software.bind(content)), path.name
        assert "__TUNNELNAT_PACKAGE_" not in json.dumps(props["Content"]), path.name
        assert props["DocumentType"] == "Command"
        # JSON: the smaller serialization of the same content (SSM's limit is 64 KB, ours 48).
        assert props["DocumentFormat"] == "JSON"
        assert len(json.dumps(props["Content"]).encode()) <= 48 * 1024, path.name
        assert props["UpdateMethod"] == "NewVersion"


# -- Controller ------------------------------------------------------------------------------


def test_table_on_demand_with_point_in_time_recovery(s):
    _, table = s.one("AWS::DynamoDB::Table")
    props = table["Properties"]
    assert props["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert sorted(
        a["AttributeName"] + a["AttributeType"] for a in props["AttributeDefinitions"]
    ) == [
        "pkS",
        "skS",
    ]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    assert table["DeletionPolicy"] == "Retain"
    assert props["TableName"] == DEPLOYMENT


def test_controller_function_python313_powertools_layer_environment(s):
    controller = s.stack.controller
    function = s.resources("AWS::Lambda::Function")[s.logical_id(controller.function)]
    props = function["Properties"]
    assert props["Runtime"] == "python3.13"
    assert props["Handler"] == "tunnelnat.handlers.controller.handler"
    assert props["TracingConfig"] == {"Mode": "Active"}
    assert props["Architectures"] == ["x86_64"]
    (layer,) = props["Layers"]
    parameter = s.json["Parameters"][layer["Ref"]]
    assert parameter["Type"] == "AWS::SSM::Parameter::Value<String>"
    # Pinned to the release the tests run (installed from requirements.txt), never "latest".
    version = importlib.metadata.version("aws-lambda-powertools")
    assert f"aws-lambda-powertools[parser,tracer]=={version}\n" in REQUIREMENTS.read_text()
    assert parameter["Default"] == f"/aws/service/powertools/python/x86_64/python3.13/{version}"
    env = props["Environment"]["Variables"]
    assert env["TUNNELNAT_TABLE_NAME"] == s.ref(controller.table)
    assert env["TUNNELNAT_DEPLOYMENT"] == DEPLOYMENT
    assert env["TUNNELNAT_DOCUMENT_PREFIX"] == f"{DEPLOYMENT}-"
    assert env["POWERTOOLS_SERVICE_NAME"] == "tunnelnat"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "tunnelnat"
    config = json.loads(env["TUNNELNAT_CONFIG"])
    from tunnelnat.core.config import TunnelnatConfig

    parsed = TunnelnatConfig.from_mapping(config, source="TUNNELNAT_CONFIG")
    assert str(parsed.partner_endpoint) == T
    assert [str(a) for a in parsed.address_pool] == CONTEXT["address_pool"]


def test_lambda_asset_is_the_lambdas_directory_without_build_litter(s):
    function = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.controller.function)]
    key = function["Properties"]["Code"]["S3Key"]
    staged = s.outdir / f"asset.{key.removesuffix('.zip')}"
    assert (staged / "tunnelnat" / "__init__.py").is_file()
    assert not list(staged.rglob("__pycache__"))
    assert not list(staged.glob("*.egg-info"))


def test_queue_with_dead_letter_queue_in_front_of_the_controller(s):
    controller = s.stack.controller
    queues = s.resources("AWS::SQS::Queue")
    queue = queues[s.logical_id(controller.queue)]["Properties"]
    dlq = queues[s.logical_id(controller.dead_letter_queue)]["Properties"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": s.arn(controller.dead_letter_queue),
        "maxReceiveCount": 12,
    }
    function = s.resources("AWS::Lambda::Function")[s.logical_id(controller.function)]
    # AWS's guidance for an SQS event source: at least six times the function's timeout.
    assert queue["VisibilityTimeout"] == 6 * function["Properties"]["Timeout"]
    assert dlq["MessageRetentionPeriod"] == 14 * 24 * 3600
    assert queue["SqsManagedSseEnabled"] is True and dlq["SqsManagedSseEnabled"] is True
    # The names the operator's CLI looks for.
    assert (queue["QueueName"], dlq["QueueName"]) == (
        f"{DEPLOYMENT}-events",
        f"{DEPLOYMENT}-events-dlq",
    )
    assert function["Properties"]["FunctionName"] == f"{DEPLOYMENT}-controller"
    _, mapping = s.one("AWS::Lambda::EventSourceMapping")
    props = mapping["Properties"]
    assert props["EventSourceArn"] == s.arn(controller.queue)
    assert props["FunctionName"] == s.ref(controller.function)
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    # Bursts coalesce: the queue gathers up to 10 events for up to 5 s into one invocation.
    assert props["BatchSize"] == 10
    assert props["MaximumBatchingWindowInSeconds"] == 5
    assert props["ScalingConfig"] == {"MaximumConcurrency": 5}


def test_the_handler_dead_letters_before_sqs_does(s):
    """The handler parks an event in the DLQ itself, with its reason, at its last attempt; the
    queue's own redrive (no reason) only catches what crashed on every attempt."""
    from tunnelnat.handlers.controller import backoff_seconds

    controller = s.stack.controller
    queues = s.resources("AWS::SQS::Queue")
    queue = queues[s.logical_id(controller.queue)]["Properties"]
    function = s.resources("AWS::Lambda::Function")[s.logical_id(controller.function)]
    env = function["Properties"]["Environment"]["Variables"]
    attempts = int(env["TUNNELNAT_MAX_ATTEMPTS"])
    assert attempts == 8
    # SQS's redrive comes after the handler's own dead letter (which says why). Waits for another
    # worker's gateway sync are sent again as new messages, so they count towards neither.
    assert queue["RedrivePolicy"]["maxReceiveCount"] > attempts
    assert env["TUNNELNAT_DLQ_URL"] == s.ref(controller.dead_letter_queue)
    # Every back-off before the last attempt, and every attempt's run, fit in the retention.
    waited = sum(backoff_seconds(n) for n in range(1, attempts))
    waited += attempts * function["Properties"]["Timeout"]
    assert waited < queue["MessageRetentionPeriod"]
    # ... and it may send there (in a statement of its own or merged by minimizePolicies).
    (send,) = [
        st
        for st in _controller_statements(s)
        if "sqs:SendMessage" in as_list(st["Action"])
        and s.arn(controller.dead_letter_queue) in as_list(st["Resource"])
    ]
    assert send["Effect"] == "Allow"


def test_controller_environment_is_what_its_settings_read(s):
    from tunnelnat.settings import ControllerSettings

    function = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.controller.function)]
    env = dict(function["Properties"]["Environment"]["Variables"])
    env |= {"TUNNELNAT_TABLE_NAME": DEPLOYMENT, "AWS_REGION": "eu-west-1"}
    env |= {"TUNNELNAT_VPC_ID": "vpc-0123456789abcdef0", "TUNNELNAT_GATEWAY_GROUP": "g"}
    env |= {"TUNNELNAT_GATEWAY_ENI_ID": "eni-0123456789abcdef0"}
    settings = ControllerSettings.from_environ(env)
    assert (settings.deployment, settings.document_prefix) == (DEPLOYMENT, f"{DEPLOYMENT}-")
    # Issue 14, findings 2 and 5: the VPC it serves and the gateway's group come from the stack.
    variables = function["Properties"]["Environment"]["Variables"]
    [vpc] = s.resources("AWS::EC2::VPC")
    assert variables["TUNNELNAT_VPC_ID"] == {"Ref": vpc}
    assert variables["TUNNELNAT_GATEWAY_GROUP"] == f"{DEPLOYMENT}-gateway"
    _, asg = s.one("AWS::AutoScaling::AutoScalingGroup")
    assert asg["Properties"]["AutoScalingGroupName"] == f"{DEPLOYMENT}-gateway"
    # Issue 21: the allow-list (empty: no restriction) and the gateways' namespace.
    assert variables["TUNNELNAT_ALLOWED_SUBNETS"] == ""
    assert variables["TUNNELNAT_ALLOWED_GROUPS"] == ""
    assert variables["TUNNELNAT_METRIC_NAMESPACE"] == f"tunnelnat/{DEPLOYMENT}"
    assert variables["TUNNELNAT_ROUTE_TABLES"] == ""
    # Issue 13: route-table mode's target, the ENI holding G.
    assert variables["TUNNELNAT_GATEWAY_ENI_ID"] == s.ref(s.stack.gateway.eni)
    assert settings.route_table_mode


RULE_PATTERNS = {
    "InstanceState": {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Instance State-change Notification"],
        "detail": {"state": ["running", "stopping", "stopped", "shutting-down", "terminated"]},
    },
    "TagChange": {
        "source": ["aws.tag"],
        "detail-type": ["Tag Change on Resource"],
        "detail": {
            "service": ["ec2"],
            "resource-type": ["instance"],
            "changed-tag-keys": [ENROLMENT_KEY],
        },
    },
    "Lifecycle": {
        "source": ["aws.autoscaling"],
        "detail-type": [
            "EC2 Instance-launch Lifecycle Action",
            "EC2 Instance-terminate Lifecycle Action",
        ],
        # Issue 14, finding 6: only tunnelnat's hooks, never another team's; issue 21,
        # finding 4: only this deployment's.
        "detail": {
            "LifecycleHookName": [
                f"tunnelnat-{DEPLOYMENT}-launch",
                f"tunnelnat-{DEPLOYMENT}-terminate",
            ]
        },
    },
}


@pytest.mark.parametrize("name", [*RULE_PATTERNS, "Reconcile"])
def test_event_rules_send_to_the_queue_with_a_dead_letter_queue(s, name):
    controller = s.stack.controller
    rule = s.resources("AWS::Events::Rule")[s.logical_id(controller.rules[name])]["Properties"]
    if name == "Reconcile":
        assert rule["ScheduleExpression"] == CONTEXT["reconcile_schedule"]
    else:
        assert rule["EventPattern"] == RULE_PATTERNS[name]
    (target,) = rule["Targets"]
    assert target["Arn"] == s.arn(controller.queue)
    assert target["DeadLetterConfig"] == {"Arn": s.arn(controller.dead_letter_queue)}


def test_queue_policy_lets_only_the_rules_send(s):
    controller = s.stack.controller
    policy = next(
        p
        for p in s.resources("AWS::SQS::QueuePolicy").values()
        if p["Properties"]["Queues"] == [s.ref(controller.queue)]
    )
    sends = [st for st in statements(policy) if st["Effect"] == "Allow"]
    sources = {
        st["Condition"]["ArnEquals"]["aws:SourceArn"]["Fn::GetAtt"][0]
        for st in sends
        if st["Principal"] == {"Service": "events.amazonaws.com"}
    }
    assert sources == {s.logical_id(rule) for rule in controller.rules.values()}
    granted = {a for st in sends for a in as_list(st["Action"])}
    assert granted <= {"sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"}


def _controller_statements(s):
    controller = s.stack.controller
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(controller.role.node.find_child("DefaultPolicy"))
    ]
    return statements(policy)


def test_send_command_only_the_documents_the_controller_sends(s):
    """Issue 21, finding 2: the three documents it sends, not the eight."""
    by_sid = {st.get("Sid"): st for st in _controller_statements(s)}
    documents = by_sid["RunOnlyTheDocumentsItSends"]
    assert documents["Action"] == "ssm:SendCommand"
    rendered = json.dumps(as_list(documents["Resource"]))
    for path in DOC_FILES:
        sent = path.stem in ("AddHostRoute", "RemoveHostRoute", "SyncNatTable")
        assert (f':document/{DEPLOYMENT}-{path.stem}"' in rendered) is sent, path.stem
    assert "*" not in rendered


def test_send_command_on_instances_only_with_the_right_tags(s):
    by_sid = {st.get("Sid"): st for st in _controller_statements(s)}
    key = ENROLMENT_KEY
    expected = {
        "OnInstancesCarryingTheEnrolmentKey": {"StringLike": {f"ssm:resourceTag/{key}": "*"}},
        "OnInstancesTheControllerEnrolled": {
            "StringLike": {f"ssm:resourceTag/tunnelnat:status:{DEPLOYMENT}": "*"}
        },
        "OnThisDeploymentsGateways": {
            "StringEquals": {"ssm:resourceTag/aws:autoscaling:groupName": f"{DEPLOYMENT}-gateway"}
        },
    }
    for sid, condition in expected.items():
        statement = by_sid[sid]
        assert statement["Action"] == "ssm:SendCommand"
        assert ":instance/*" in json.dumps(statement["Resource"])
        assert statement["Condition"] == condition, sid
    # No SendCommand on instances without one of those conditions.
    for st in _controller_statements(s):
        if "ssm:SendCommand" in as_list(st["Action"]) and "instance" in json.dumps(st["Resource"]):
            assert st.get("Condition"), st


def test_controller_least_privilege(s):
    allowed_star = {
        "ec2:DescribeInstances",
        # Route-table mode (issue 13): no resource-level permissions either.
        "ec2:DescribeRouteTables",
        "ssm:GetCommandInvocation",
        "ssm:ListCommands",
        # Auto Scaling's Describe actions have no resource types (Service Authorization Reference).
        "autoscaling:DescribeAutoScalingInstances",
        "autoscaling:DescribeLifecycleHooks",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }
    for st in _controller_statements(s):
        actions = set(as_list(st["Action"]))
        assert not any(a.endswith("*") for a in actions), st
        if st["Resource"] == "*":
            assert actions <= allowed_star, st
    by_sid = {st.get("Sid"): st for st in _controller_statements(s)}
    table = by_sid["OwnTable"]
    assert table["Resource"] == s.arn(s.stack.controller.table)
    assert "dynamodb:Scan" not in table["Action"]
    for sid in ("StatusTagOnEnrolmentTaggedInstances", "StatusTagRemovedWhereItIs"):
        tags = by_sid[sid]["Condition"]
        assert tags["ForAllValues:StringEquals"] == {
            "aws:TagKeys": [f"tunnelnat:status:{DEPLOYMENT}"]
        }
        assert tags["Null"] == {"aws:TagKeys": "false"}
        assert "ec2:Vpc" in tags["ArnEqualsIfExists"]
    assert by_sid["StatusTagRemovedWhereItIs"]["Action"] == "ec2:DeleteTags"
    lifecycle = by_sid["LifecycleOfEnrolledGroups"]
    assert set(lifecycle["Action"]) == {
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
    }
    assert lifecycle["Condition"] == {"StringLike": {f"aws:ResourceTag/{ENROLMENT_KEY}": "*"}}


# -- Monitoring ------------------------------------------------------------------------------


def test_tunnel_up_alarm_missing_data_breaching_pages_the_topic(s):
    monitoring = s.stack.monitoring
    (alarm_construct,) = monitoring.tunnel_alarms.values()
    alarm = s.resources("AWS::CloudWatch::Alarm")[s.logical_id(alarm_construct)]["Properties"]
    # Issue 21, finding 3: the namespace only this deployment's gateways may publish to.
    assert alarm["Namespace"] == f"tunnelnat/{DEPLOYMENT}"
    assert alarm["MetricName"] == "TunnelUp"
    # The per-deployment series: a replaced gateway keeps feeding it (docs/health.md).
    assert sorted(alarm["Dimensions"], key=lambda d: d["Name"]) == [
        {"Name": "Deployment", "Value": DEPLOYMENT},
        {"Name": "Tunnel", "Value": CONTEXT["tunnel_name"]},
    ]
    assert alarm["AlarmName"] == f"tunnelnat-{DEPLOYMENT}-TunnelUp-{CONTEXT['tunnel_name']}"
    assert (alarm["DatapointsToAlarm"], alarm["EvaluationPeriods"], alarm["Period"]) == (2, 3, 60)
    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["ComparisonOperator"] == "LessThanThreshold"
    assert alarm["Threshold"] == 1
    assert alarm["Statistic"] == "Minimum"
    assert alarm["AlarmActions"] == [s.ref(monitoring.topic)]
    assert alarm["OKActions"] == [s.ref(monitoring.topic)]


def test_dead_letter_queue_depth_alarm_pages_the_topic(s):
    monitoring, controller = s.stack.monitoring, s.stack.controller
    alarm = s.resources("AWS::CloudWatch::Alarm")[s.logical_id(monitoring.dlq_alarm)]["Properties"]
    assert alarm["Namespace"] == "AWS/SQS"
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [
        {
            "Name": "QueueName",
            "Value": {"Fn::GetAtt": [s.logical_id(controller.dead_letter_queue), "QueueName"]},
        }
    ]
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["Threshold"] == 1
    assert alarm["AlarmActions"] == [s.ref(monitoring.topic)]


def test_topic_is_encrypted_tls_only_and_cloudwatch_can_use_its_key(s):
    monitoring = s.stack.monitoring
    _, topic = s.one("AWS::SNS::Topic")
    assert topic["Properties"]["KmsMasterKeyId"] == s.arn(monitoring.key)
    key = s.resources("AWS::KMS::Key")[s.logical_id(monitoring.key)]
    assert key["Properties"]["EnableKeyRotation"] is True
    services = {
        st["Principal"].get("Service")
        for st in key["Properties"]["KeyPolicy"]["Statement"]
        if isinstance(st["Principal"], dict)
    }
    assert {"cloudwatch.amazonaws.com", "events.amazonaws.com"} <= services
    _, policy = s.one("AWS::SNS::TopicPolicy")
    assert any(
        st["Effect"] == "Deny" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for st in statements(policy)
    )


def test_gateway_replacement_is_announced(s):
    monitoring = s.stack.monitoring
    rule = s.resources("AWS::Events::Rule")[s.logical_id(monitoring.gateway_rule)]["Properties"]
    assert rule["EventPattern"]["source"] == ["aws.autoscaling"]
    assert "EC2 Instance Terminate Successful" in rule["EventPattern"]["detail-type"]
    assert rule["EventPattern"]["detail"] == {
        "AutoScalingGroupName": [{"Ref": s.one("AWS::AutoScaling::AutoScalingGroup")[0]}]
    }
    assert rule["Targets"][0]["Arn"] == s.ref(monitoring.topic)


def test_dashboard_shows_tunnels_queue_and_controller(s):
    _, dashboard = s.one("AWS::CloudWatch::Dashboard")
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for text in ("TunnelUp", "ApproximateNumberOfMessagesVisible", "Invocations", "Alarms"):
        assert text in body


def test_no_lookups_and_no_credentials_needed(s):
    # Every AZ is explicit or Fn::GetAZs; nothing was recorded as missing context.
    manifest = json.loads((s.outdir / "manifest.json").read_text())
    assert not manifest.get("missing")
    s.template.has_resource_properties(
        "AWS::EC2::Subnet", {"CidrBlock": SUBNET, "MapPublicIpOnLaunch": False}
    )
    s.template.has_resource_properties(
        "AWS::EC2::FlowLog", Match.object_like({"TrafficType": "ALL"})
    )


def test_without_a_partners_file_nothing_of_the_lanes(s):
    """Issue 23: a deployment without a partners file is today's single partner: no lane
    parameter, no lane table, no partners path anywhere, the one ConfigureTunnel association."""
    # The documents declare the partner parameters; nothing else of the template names them.
    text = json.dumps(
        {k: v for k, v in s.json["Resources"].items() if v["Type"] != "AWS::SSM::Document"}
    )
    for word in ("/partners", "PartnersPath", "PartnersDigest", "IkeVersion", "TUNNELNAT_PARTNERS"):
        assert word not in text, word
    tables = s.resources("AWS::DynamoDB::Table").values()
    assert [r["Properties"]["TableName"] for r in tables] == [DEPLOYMENT]
    assert s.stack.lanes is None and s.stack.psk_rollout is not None and not s.stack.psk_rollouts
    names = sorted(
        r["Properties"]["AssociationName"] for r in s.resources("AWS::SSM::Association").values()
    )
    assert f"{DEPLOYMENT}-ConfigureTunnel" in names
    assert not [n for n in names if n.startswith(f"{DEPLOYMENT}-ConfigureTunnel-")]
