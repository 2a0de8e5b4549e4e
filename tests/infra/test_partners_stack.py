"""Several partners on one gateway pair (issue 23): the stack with a partners file.

One synthesis per module (cdk-nag on) of a three-partner file: an AWS-like IKEv2 peer, a legacy
IKEv1 bank (per-pair, shared S) and a clearing house whose network is the first one's (reached
through an alias). Each partner is a lane (core/lanes.py): its own table, published parameter,
ConfigureTunnel association (IkeVersion), TunnelUp alarm, PSK rollout and IAM. The error cases
need no synthesis (load_settings).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from stacks.documents import MAX_GATEWAY_DOCUMENT_BYTES
from stacks.gateway import TUNNELS_DIR, child_sa_names
from stacks.lanes import lanes_digest
from stacks.settings import load_settings
from tests.infra.conftest import EXAMPLE_CONTEXT, cdk_json_context, synthesize
from tests.infra.iam_eval import Resolver, is_allowed
from tunnelnat.core.config import ConfigError
from tunnelnat.core.lanes import load_lanes, parameter_path

DOCUMENTS_DIR = Path(__file__).resolve().parents[2] / "ssm_documents"
G, SUBNET = EXAMPLE_CONTEXT["gateway_private_ip"], EXAMPLE_CONTEXT["gateway_subnet_cidr"]
ACCOUNT, REGION = "123456789012", "eu-west-1"
PATH = "/tunnelnat/tunnelnat/partners"

PARTNERS = {
    "alias_block": "100.64.0.0/10",
    "partners": [
        {
            "name": "card-processor",
            "endpoint": "198.51.100.10",
            "networks": ["10.0.0.0/24"],
            "auth": {"psk_secret": "tunnelnat/card-processor-psk"},
            "nat": {"mode": "dedicated", "pool": ["203.0.113.10", "203.0.113.11"]},
        },
        {
            "name": "bank",
            "endpoint": "198.51.100.20",
            "networks": ["172.20.0.0/24", "172.20.5.0/28"],
            "ike_version": 1,
            "auth": {"psk_secret": "tunnelnat/bank-psk"},
            "proposals": {"ike": ["aes256-sha256-modp2048"], "esp": ["aes256-sha256-modp2048"]},
            "dpd": {"delay": 20, "timeout": 60},
            "remote_id": "vpn.bank.example",
            "start_action": "none",
            "nat": {"mode": "shared", "address": "203.0.113.20"},
        },
        {
            # The card processor's network: instances reach it through an alias.
            "name": "clearing-house",
            "endpoint": "192.0.2.30",
            "networks": ["10.0.0.0/24"],
            "auth": {"psk_secret": "tunnelnat/clearing-house-psk"},
            "proposals": {"ike": ["aes256gcm16-prfsha384-ecp384"], "esp": ["aes256gcm16-ecp384"]},
            "local_id": "vpn.payments.example",
            "nat": {"mode": "dedicated", "pool": ["203.0.113.30"]},
        },
    ],
}
NAMES = [p["name"] for p in PARTNERS["partners"]]
SINGLE_KEYS = ("partner_endpoint", "partner_networks", "address_pool")


def partners_context(path: Path, **overrides: Any) -> dict[str, Any]:
    """cdk.json's context and the example's gateway keys, no single-partner keys, the file."""
    base = {k: v for k, v in EXAMPLE_CONTEXT.items() if k not in SINGLE_KEYS}
    return cdk_json_context() | base | {"partners_file": str(path)} | overrides


def documents_with_partners_path(directory: Path) -> Path:
    """The project's documents; ConfigureGateway with PartnersPath/PartnersDigest as the plan
    declares them (plan-23b, H1) if the committed one does not declare them yet."""
    content = yaml.safe_load((DOCUMENTS_DIR / "ConfigureGateway.yaml").read_text())
    if "PartnersPath" in content["parameters"]:
        return DOCUMENTS_DIR
    copy = directory / "ssm_documents"
    shutil.copytree(DOCUMENTS_DIR, copy)
    content["parameters"]["PartnersPath"] = {
        "type": "String",
        "default": "",
        "allowedPattern": "^(/tunnelnat/[a-z][a-z0-9-]{1,28}[a-z0-9]/partners)?$",
    }
    content["parameters"]["PartnersDigest"] = {
        "type": "String",
        "default": "",
        "allowedPattern": "^[0-9a-f]{0,64}$",
    }
    (copy / "ConfigureGateway.yaml").write_text(yaml.safe_dump(content))
    return copy


@pytest.fixture(scope="module")
def partners_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("partners") / "partners.yaml"
    path.write_text(yaml.safe_dump(PARTNERS))
    return path


@pytest.fixture(scope="module")
def s(tmp_path_factory, partners_file):
    # cdk-nag on: synthesis itself fails on an unacknowledged finding.
    out = tmp_path_factory.mktemp("cdk.out")
    documents = documents_with_partners_path(tmp_path_factory.mktemp("documents"))
    overrides = partners_context(partners_file)
    for key in SINGLE_KEYS:
        overrides.pop(key, None)
    import tests.infra.conftest as conftest

    saved = dict(conftest.EXAMPLE_CONTEXT)
    try:
        for key in SINGLE_KEYS:
            conftest.EXAMPLE_CONTEXT.pop(key)
        return synthesize(out, overrides, documents_dir=documents)
    finally:
        conftest.EXAMPLE_CONTEXT.clear()
        conftest.EXAMPLE_CONTEXT.update(saved)


@pytest.fixture(scope="module")
def lanes(s):
    return s.stack.settings.lanes


def association(s, name: str) -> dict[str, str]:
    found = [
        r
        for r in s.resources("AWS::SSM::Association").values()
        if r["Properties"]["AssociationName"] == name
    ]
    assert len(found) == 1, name
    return {k: v[0] for k, v in found[0]["Properties"]["Parameters"].items()}


def statements_of(s, role) -> list[dict[str, Any]]:
    """The role's identity statements, tokens resolved: its default policy and the managed
    policies CDK moves the overflow into (AWS::IAM::ManagedPolicy with Roles)."""
    logical = s.logical_id(role)
    resolver = Resolver(s.json)
    found: list[dict[str, Any]] = []
    for resource in s.json["Resources"].values():
        if resource["Type"] not in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            continue
        if {"Ref": logical} in resource["Properties"].get("Roles", []):
            found += resource["Properties"]["PolicyDocument"]["Statement"]
    return [resolver.resolve(st) for st in found]


# -- what each lane gets ---------------------------------------------------------------------


def test_the_lanes_are_the_files_partners_in_order(lanes):
    assert [lane.name for lane in lanes] == NAMES
    assert [lane.index for lane in lanes] == [1, 2, 3]
    card, bank, clearing = lanes
    assert clearing.networks == (IPv4Network("10.0.0.0/24"),)  # real: the selectors
    assert clearing.aliases == (IPv4Network("100.64.0.0/24"),)  # what instances use
    assert bank.ike_version == 1 and card.ike_version == 2
    assert [lane.tag_key for lane in lanes] == [f"tunnelnat:partner:{n}" for n in NAMES]


def test_a_table_per_lane_like_the_deployments(s, lanes):
    tables = {r["Properties"]["TableName"]: r for r in s.resources("AWS::DynamoDB::Table").values()}
    assert set(tables) == {"tunnelnat", *(lane.table for lane in lanes)}
    assert {lane.table for lane in lanes} == {f"tunnelnat-{n}" for n in NAMES}
    main = tables["tunnelnat"]
    for lane in lanes:
        table = tables[lane.table]
        assert table["Properties"] | {"TableName": "x"} == main["Properties"] | {"TableName": "x"}
        assert (table["DeletionPolicy"], table["UpdateReplacePolicy"]) == ("Retain", "Retain")


def test_a_published_parameter_per_lane_that_reads_back_as_the_lanes(s, lanes):
    parameters = {
        r["Properties"]["Name"]: r["Properties"]
        for r in s.resources("AWS::SSM::Parameter").values()
        if r["Properties"]["Name"].startswith(PATH)
    }
    assert parameters.keys() == {f"{PATH}/{n}" for n in NAMES}
    assert parameter_path("tunnelnat") == PATH
    for props in parameters.values():
        assert props["Type"] == "String" and props["Tier"] == "Standard"
        assert len(props["Value"].encode()) < 4096
    assert load_lanes(p["Value"] for p in parameters.values()) == lanes


def test_configure_tunnel_per_partner_with_its_real_networks_s_psk_and_ike(s, lanes):
    document = s.stack.documents.contents["ConfigureTunnel"]["parameters"]
    public_ip = {"Fn::GetAtt": [s.logical_id(s.stack.gateway.node.find_child("Eip")), "PublicIp"]}
    card, bank, clearing = (association(s, f"tunnelnat-ConfigureTunnel-{n}") for n in NAMES)
    assert {k: card[k] for k in ("TunnelName", "IkeVersion", "PartnerEndpoint")} == {
        "TunnelName": "card-processor",
        "IkeVersion": "2",
        "PartnerEndpoint": "198.51.100.10",
    }
    assert card["PublicAddresses"] == "203.0.113.10,203.0.113.11"
    assert card["PskSecretName"] == "tunnelnat/card-processor-psk"
    assert card["LocalId"] == public_ip and card["RemoteId"] == ""
    assert card["SelectorLayout"] == "single" and card["StartAction"] == "start"
    # IKEv1: per-pair by default, its own DPD, identity, start action and shared S.
    assert bank["IkeVersion"] == "1" and bank["SelectorLayout"] == "per-pair"
    assert bank["PartnerNetworks"] == "172.20.0.0/24,172.20.5.0/28"
    assert (bank["Dpd"], bank["RemoteId"], bank["StartAction"]) == (
        "20,60",
        "vpn.bank.example",
        "none",
    )
    assert bank["PublicAddresses"] == "203.0.113.20"
    # The overlapping partner: selectors on its REAL network, never the alias.
    assert clearing["PartnerNetworks"] == "10.0.0.0/24"
    assert clearing["LocalId"] == "vpn.payments.example"
    assert clearing["IkeProposals"] == "aes256gcm16-prfsha384-ecp384"
    assert clearing["EspProposals"] == "aes256gcm16-ecp384"
    for params in (card, bank, clearing):
        assert params["LocalAddress"] == G  # the pair: IKE only from G
        assert params["KeyingTries"] == "0"
        for key, value in params.items():
            pattern = document[key].get("allowedPattern")
            if pattern and isinstance(value, str):
                assert re.search(pattern, value), (key, value)
    # No single-partner association beside them.
    names = {
        r["Properties"]["AssociationName"] for r in s.resources("AWS::SSM::Association").values()
    }
    assert "tunnelnat-ConfigureTunnel" not in names


def test_configure_gateway_reads_the_lanes_by_path_with_their_digest(s, lanes):
    params = association(s, "tunnelnat-ConfigureGateway")
    assert params["PartnersPath"] == PATH
    assert params["PartnersDigest"] == lanes_digest(lanes)
    assert re.fullmatch(r"[0-9a-f]{64}", params["PartnersDigest"])
    # Any lane's change is a new digest (State Manager re-runs the association on it).
    changed = list(lanes)
    changed[1] = type(changed[1])(**{**changed[1].__dict__, "endpoint": changed[0].endpoint})
    assert lanes_digest(changed) != lanes_digest(lanes)


def test_the_lanes_exist_before_the_associations_that_read_them(s, lanes):
    resources = s.json["Resources"]

    def depends(association_name: str) -> set[str]:
        found = [
            r for r in resources.values()
            if r["Type"] == "AWS::SSM::Association"
            and r["Properties"]["AssociationName"] == association_name
        ]  # fmt: skip
        return set(found[0].get("DependsOn", []))

    gateway = depends("tunnelnat-ConfigureGateway")
    for lane in lanes:
        parameter = s.logical_id(s.stack.lanes.parameters[lane.name])
        assert parameter in gateway and s.logical_id(s.stack.lanes.tables[lane.name]) in gateway
        assert parameter in depends(f"tunnelnat-ConfigureTunnel-{lane.name}")


def test_gateway_documents_stay_under_8_kb(s):
    documents = s.stack.documents
    assert documents.declares("ConfigureTunnel", "IkeVersion")
    for stem in documents.gateway_documents:
        assert documents.sizes[stem] <= MAX_GATEWAY_DOCUMENT_BYTES, stem


def test_ike_version_reaches_the_verb():
    content = yaml.safe_load((DOCUMENTS_DIR / "ConfigureTunnel.yaml").read_text())
    assert content["parameters"]["IkeVersion"]["default"] == "2"
    assert content["parameters"]["IkeVersion"]["allowedPattern"] == "^(1|2)$"
    script = "\n".join(content["mainSteps"][0]["inputs"]["runCommand"])
    assert '--ike-version "{{ IkeVersion }}"' in script


def test_the_security_group_admits_ike_and_esp_from_each_endpoint_only(s, lanes):
    _, group = next(
        (k, v)
        for k, v in s.resources("AWS::EC2::SecurityGroup").items()
        if k == s.logical_id(s.stack.gateway.security_group)
    )
    rules = group["Properties"]["SecurityGroupIngress"]
    for lane in lanes:
        mine = {
            (r["IpProtocol"], r.get("FromPort"))
            for r in rules
            if r["CidrIp"] == f"{lane.endpoint}/32"
        }
        assert mine == {("udp", 500), ("udp", 4500), ("50", None)}, lane.name
    assert not [r for r in rules if r["CidrIp"] == "0.0.0.0/0"]


# -- monitoring and healing ---------------------------------------------------------------------


def test_a_tunnel_up_alarm_per_partner_and_the_healer_restarts_by_its_dimension(s):
    alarms = {
        r["Properties"]["AlarmName"]: r["Properties"]
        for r in s.resources("AWS::CloudWatch::Alarm").values()
        if r["Properties"].get("MetricName") == "TunnelUp"
    }
    assert set(alarms) == {f"tunnelnat-tunnelnat-TunnelUp-{n}" for n in NAMES}
    for name in NAMES:
        dimensions = {
            d["Name"]: d["Value"]
            for d in alarms[f"tunnelnat-tunnelnat-TunnelUp-{name}"]["Dimensions"]
        }
        assert dimensions == {"Deployment": "tunnelnat", "Tunnel": name}
    # The healer's rule and sweep take this deployment's prefix: every partner's alarm.
    env = s.json["Resources"][s.logical_id(s.stack.healer.function)]["Properties"]["Environment"]
    assert env["Variables"]["TUNNELNAT_HEALER_ALARM_PREFIX"] == "tunnelnat-tunnelnat-TunnelUp-"


def test_the_healer_restarts_exactly_the_partner_its_alarm_names(s):
    """The healer reads the tunnel from the alarm's Tunnel dimension (DescribeAlarms gives the
    template's properties back) and sends RestartTunnel with that TunnelName only."""
    from tunnelnat.healer import tunnel_of

    namespace = s.stack.settings.stack.gateway_metric_namespace
    for name, alarm in s.stack.monitoring.tunnel_alarms.items():
        props = s.json["Resources"][s.logical_id(alarm)]["Properties"]
        assert tunnel_of(props, namespace) == name
        s.stack.documents.check_parameters("RestartTunnel", {"TunnelName": name})


def test_the_dashboard_shows_each_pooled_partners_free_addresses(s):
    dashboard = json.dumps(s.json["Resources"][s.logical_id(s.stack.monitoring.dashboard)])
    for name in ("card-processor", "clearing-house"):
        assert f'\\"Partner\\",\\"{name}\\"' in dashboard, name
    assert '\\"Partner\\",\\"bank\\"' not in dashboard  # shared: one S, no pool


def test_the_health_agent_is_given_every_partners_tunnel(s):
    params = association(s, "tunnelnat-InstallHealthAgent")
    # One agent, every partner's TunnelUp; no probe (it would cross one partner's tunnel only).
    assert params["TunnelName"] == ",".join(NAMES)
    assert (params["ProbeTarget"], params["ProbeSource"]) == ("", "")
    report = (s.outdir / "validation-report.json").read_text()
    assert "healthAgentOneTunnel" not in report


def test_a_psk_rollout_per_partner_runs_that_partners_configure_tunnel(s):
    rollouts = s.stack.psk_rollouts
    assert set(rollouts) == set(NAMES) and s.stack.psk_rollout is None
    for name, rollout in rollouts.items():
        rule = s.json["Resources"][s.logical_id(rollout.rule)]["Properties"]
        # An imported secret: matched by its name (stacks/psk_rollout.py).
        assert rule["EventPattern"]["detail"]["name"] == [f"tunnelnat/{name}-psk"]
        # Exactly that partner's association's parameters (read from it: they cannot drift).
        association = s.stack.gateway.tunnel_associations[name]
        assert rollout.parameters == dict(association.parameters)
        assert rollout.parameters["TunnelName"] == [name]
    # One role for them all: it may send ConfigureTunnel to this deployment's gateways only.
    assert len({id(r.role) for r in rollouts.values()}) == 1


def test_no_deployment_psk_is_created_each_partner_names_its_own(s):
    secrets = s.resources("AWS::SecretsManager::Secret")
    assert [k for k in secrets if "Psk" in k] == []  # only the pair's heartbeat key
    outputs = s.json["Outputs"]
    assert "PskSecretName" not in outputs
    assert outputs["PartnersPath"]["Value"] == PATH


# -- the controller ------------------------------------------------------------------------------


def test_the_controller_reads_the_lanes_and_hears_every_partners_tag(s, lanes):
    function = s.json["Resources"][s.logical_id(s.stack.controller.function)]
    env = function["Properties"]["Environment"]["Variables"]
    assert env["TUNNELNAT_PARTNERS_PATH"] == PATH
    assert env["TUNNELNAT_PARTNERS_DIGEST"] == lanes_digest(lanes)
    # The base config is still the controller's (placement, enrolment key and value, MSS).
    config = json.loads(env["TUNNELNAT_CONFIG"])
    assert (config["gateway_private_ip"], config["enrolment_tag_key"]) == (G, "tunnelnat")
    rule = s.json["Resources"][s.logical_id(s.stack.controller.rules["TagChange"])]
    keys = rule["Properties"]["EventPattern"]["detail"]["changed-tag-keys"]
    assert keys == ["tunnelnat", *(lane.tag_key for lane in lanes)]


def resolved_arn(s, construct) -> str:
    return Resolver(s.json).resolve({"Fn::GetAtt": [s.logical_id(construct), "Arn"]})


def test_controller_iam_per_lane(s, lanes):
    policy = statements_of(s, s.stack.controller.role)
    resolver = Resolver(s.json)
    path_arn = resolver.arn("ssm", f"parameter{PATH}")
    assert is_allowed(policy, "ssm:GetParametersByPath", {path_arn: {}})
    assert not is_allowed(
        policy, "ssm:GetParametersByPath", {resolver.arn("ssm", "parameter/x"): {}}
    )
    instance = resolver.arn("ec2", "instance/i-0123456789abcdef0")
    vpc = {"ec2:Vpc": resolver.resolve({"Fn::Join": ["", [
        "arn:", {"Ref": "AWS::Partition"}, ":ec2:", {"Ref": "AWS::Region"}, ":",
        {"Ref": "AWS::AccountId"}, ":vpc/", {"Ref": s.logical_id(s.stack.node.find_child("Vpc"))},
    ]]})}  # fmt: skip
    for lane in lanes:
        table = resolved_arn(s, s.stack.lanes.tables[lane.name])
        for action in ("dynamodb:PutItem", "dynamodb:Query", "dynamodb:DeleteItem"):
            assert is_allowed(policy, action, {table: {}}), (lane.name, action)
        tagged = {f"aws:ResourceTag/{lane.tag_key}": "enabled", **vpc}
        own = {"aws:TagKeys": [lane.status_tag]}
        assert is_allowed(policy, "ec2:CreateTags", {instance: tagged | own})
        assert is_allowed(
            policy, "ssm:SendCommand", {instance: {f"ssm:resourceTag/{lane.tag_key}": "enabled"}}
        )
        # Never another key, never on an instance carrying none of ours.
        assert not is_allowed(
            policy, "ec2:CreateTags", {instance: tagged | {"aws:TagKeys": ["Name"]}}
        )
        assert not is_allowed(
            policy, "ec2:CreateTags", {instance: {**vpc, **own, "aws:ResourceTag/x": "y"}}
        )
    # Any lane's mark may be removed where it is (removing a mark only takes a permission
    # away); nothing else, and never another deployment's.
    assert is_allowed(
        policy, "ec2:DeleteTags", {instance: {**vpc, "aws:TagKeys": [lanes[1].status_tag]}}
    )
    for key in ("Name", "tunnelnat:status:tunnelnat-2:bank", "tunnelnat"):
        assert not is_allowed(policy, "ec2:DeleteTags", {instance: {**vpc, "aws:TagKeys": [key]}})
    # One lane's tag does not open another lane's status key.
    first, second = lanes[0], lanes[1]
    cross = {
        f"aws:ResourceTag/{first.tag_key}": "enabled",
        **vpc,
        "aws:TagKeys": [second.status_tag],
    }
    assert not is_allowed(policy, "ec2:CreateTags", {instance: cross})


def test_gateway_iam_reads_the_lanes_their_tables_and_each_psk(s, lanes):
    policy = statements_of(s, s.stack.gateway.role)
    resolver = Resolver(s.json)
    assert is_allowed(
        policy, "ssm:GetParametersByPath", {resolver.arn("ssm", f"parameter{PATH}"): {}}
    )
    for lane in lanes:
        table = resolved_arn(s, s.stack.lanes.tables[lane.name])
        assert is_allowed(policy, "dynamodb:Query", {table: {}})
        assert not is_allowed(policy, "dynamodb:PutItem", {table: {}})
        secret = resolver.arn("secretsmanager", f"secret:tunnelnat/{lane.name}-psk-AbCdEf")
        assert is_allowed(policy, "secretsmanager:GetSecretValue", {secret: {}})
    other = resolver.arn("secretsmanager", "secret:tunnelnat/other-psk-AbCdEf")
    assert not is_allowed(policy, "secretsmanager:GetSecretValue", {other: {}})


def test_no_partner_but_the_first_is_in_the_launch_template(s, lanes):
    """Adding or removing a partner (after the first) must not replace the gateways (every
    partner's SAs would go with them): the user data names none of the others."""
    _, template = s.one("AWS::EC2::LaunchTemplate")
    text = json.dumps(template)
    for lane in lanes[1:]:
        assert lane.name not in text and str(lane.endpoint) not in text, lane.name


def test_pair_json_reads_the_tunnels_configure_tunnel_records(s):
    _, template = s.one("AWS::EC2::LaunchTemplate")
    parts = template["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    text = "".join(p if isinstance(p, str) else "x" for p in parts)
    files = {f["path"]: f for f in yaml.safe_load(text)["write_files"]}
    pair = json.loads(files["/etc/tunnelnat/pair.json"]["content"])
    assert pair["tunnels_dir"] == TUNNELS_DIR
    assert (pair["tunnel"], pair["children"]) == ("card-processor", ["card-processor"])
    assert child_sa_names("bank", "per-pair", 2) == ["bank-1", "bank-2"]


# -- compliance ------------------------------------------------------------------------------------


def test_cdk_nag_finds_nothing_unacknowledged(s):
    report = json.loads((s.outdir / "validation-report.json").read_text())
    errors = [
        v
        for r in report["pluginReports"]
        for v in r.get("violations", [])
        if v.get("severity") == "error"
    ]
    assert errors == []


def test_cfn_lint_finds_no_error(s):
    beside = Path(sys.executable).with_name("cfn-lint")
    found = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed (requirements-dev.txt)"
    result = subprocess.run(
        [found, "--non-zero-exit-code", "error", str(s.template_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- refused at synthesis ----------------------------------------------------------------------


def problems(context: Mapping[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(context)
    return str(caught.value)


def test_single_partner_keys_beside_a_partners_file_are_refused_all_at_once(partners_file):
    message = problems(
        partners_context(
            partners_file,
            partner_endpoint="203.0.113.1",
            address_pool="192.0.2.10",
            nat_mode="shared",
            tunnel_name="bank",
            ike_proposals="aes256-sha256-modp2048",
            psk_secret_name="x",
        )
    )
    for key in (
        "partner_endpoint",
        "address_pool",
        "nat_mode",
        "tunnel_name",
        "ike_proposals",
        "psk_secret_name",
    ):
        assert re.search(rf"^  {key}: a single-partner key", message, re.MULTILINE), key


def test_cdk_jsons_own_defaults_are_no_single_partner_choice(partners_file):
    # cdk.json carries nat_mode=dedicated and tunnel_name=partner for the quick start.
    context = partners_context(partners_file)
    assert (context["nat_mode"], context["tunnel_name"]) == ("dedicated", "partner")
    settings = load_settings(context)
    assert [lane.name for lane in settings.lanes] == NAMES
    assert settings.stack.route_table_mode is False  # off with a partners file


def test_context_file_and_gateway_problems_come_at_once(tmp_path):
    bad = json.loads(json.dumps(PARTNERS))
    bad["partners"][1]["endpoint"] = "10.80.3.3"  # inside our VPC
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    message = problems(
        partners_context(
            path,
            partner_networks="198.51.100.0/28",  # a single-partner key
            gateway_private_ip="10.81.0.10",  # outside gateway_subnet_cidr
            tunnel_alarm_datapoints="9",  # more than the evaluation periods (a stack key)
        )
    )
    assert "partner_networks: a single-partner key" in message
    assert "partners[1] (bank).endpoint: 10.80.3.3 lies inside our VPC 10.80.0.0/16" in message
    assert "tunnel_alarm_datapoints cannot exceed" in message
    # The gateway's own keys are checked with the first partner's addressing: once the file is
    # valid, together with the context's other problems.
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(PARTNERS))
    message = problems(
        partners_context(good, partner_networks="198.51.100.0/28", gateway_private_ip="10.81.0.10")
    )
    assert "partner_networks: a single-partner key" in message
    assert "gateway_private_ip 10.81.0.10 is outside gateway_subnet_cidr" in message


def test_route_table_mode_is_refused_with_a_partners_file(partners_file):
    message = problems(partners_context(partners_file, route_table_mode="true"))
    assert "route_table_mode: not supported with partners_file yet" in message


def test_a_bad_file_names_every_problem_with_its_partner(tmp_path):
    bad = json.loads(json.dumps(PARTNERS))
    del bad["alias_block"]  # the clearing house now overlaps without an alias
    bad["partners"][2]["nat"]["pool"] = ["203.0.113.11"]  # the card processor's S
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    message = problems(partners_context(path, route_table_mode="true"))
    assert "partners[2] (clearing-house).nat.pool: 203.0.113.11 is also in" in message
    assert "partners[2] (clearing-house).networks[0]: 10.0.0.0/24 overlaps" in message
    assert "route_table_mode: not supported" in message  # with the file's, at once


def test_a_missing_or_unparsable_file_is_named(tmp_path):
    assert "no such file" in problems(partners_context(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("partners: [\n")
    assert "not valid YAML" in problems(partners_context(broken))


def test_a_relative_path_is_read_from_the_app_directory(partners_file, monkeypatch):
    import stacks.settings as settings_module

    monkeypatch.setattr(settings_module, "APP_DIR", partners_file.parent)
    assert len(load_settings(partners_context(Path("partners.yaml"))).lanes) == 3


def test_certificates_and_secret_arns_are_not_deployable_yet(tmp_path):
    data = json.loads(json.dumps(PARTNERS))
    data["partners"][0]["auth"] = {"certificate": {"secret": "ours", "ca": "theirs"}}
    data["partners"][1]["auth"] = {
        "psk_secret": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tunnelnat/bank-psk"
    }
    path = tmp_path / "cert.yaml"
    path.write_text(yaml.safe_dump(data))
    message = problems(partners_context(path))
    assert (
        "partners[0] (card-processor).auth: certificate authentication is not deployable yet"
        in message
    )
    assert "partners[1] (bank).auth.psk_secret: give the secret's name" in message


def test_the_gateways_own_keys_are_still_required(partners_file):
    context = partners_context(partners_file)
    del context["gateway_private_ip"]
    assert "gateway_private_ip: missing" in problems(context)


def test_the_health_probe_is_not_per_partner_yet(partners_file):
    message = problems(
        partners_context(
            partners_file, health_probe_target="10.0.0.5:443", health_probe_source="203.0.113.10"
        )
    )
    assert "health_probe_target: not supported with partners_file yet" in message


def test_a_partner_overlapping_our_vpc_is_aliased_in_the_lanes(tmp_path):
    data = json.loads(json.dumps(PARTNERS))
    data["partners"][0]["networks"] = ["10.80.5.0/24"]  # inside vpc_cidr 10.80.0.0/16
    path = tmp_path / "vpc.yaml"
    path.write_text(yaml.safe_dump(data))
    first = load_settings(partners_context(path)).lanes[0]
    assert first.networks == (IPv4Network("10.80.5.0/24"),)
    assert first.aliases and not first.aliases[0].overlaps(IPv4Network("10.80.0.0/16"))
    assert SUBNET == "10.80.0.0/24"
