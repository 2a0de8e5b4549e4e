"""Bad context fails synthesis with a message naming the key; every key is documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from stacks.application import build_app, cdk_json_context
from stacks.documents import DocumentError
from stacks.settings import ALL_KEYS, REQUIRED_KEYS, load_settings, missing_keys
from tests.infra.conftest import DOCUMENTS_DIR, EXAMPLE_CONTEXT, ROOT, example_context
from tunnelnat.core.config import ConfigError

BAD = [
    ("partner_endpoint", "not-an-ip", "partner_endpoint"),
    ("partner_networks", "198.51.100.0/33", "partner_networks"),
    ("nat_mode", "sometimes", "nat_mode"),
    ("tunnelnat:gatewayPair", "maybe", "tunnelnat:gatewayPair"),
    ("address_pool", "", "address_pool"),
    ("gateway_private_ip", "10.80.0.1", "gateway_private_ip"),
    ("gateway_private_ip", "10.81.0.10", "gateway_private_ip"),
    ("gateway_subnet_cidr", "10.80.7.0/24", "gateway_subnet_cidr"),
    ("enrolment_tag_key", "tunnelnat;reboot", "enrolment_tag_key"),
    ("tunnel_mss", "99999", "tunnel_mss"),
    ("deployment", "Not_Valid", "deployment"),
    ("vpc_id", "vpc-0123456789abcdef0", "gateway_subnet_id"),
    ("gateway_eip_allocation_id", "eipalloc-0123456789abcdef0", "gateway_eip_address"),
    ("gateway_ami_id", "ami-0123456789abcdef0", "region"),
    ("tunnel_alarm_period_seconds", "45", "tunnel_alarm_period_seconds"),
    ("log_retention_days", "8", "log_retention_days"),
    ("alarm_email", "ops at example", "alarm_email"),
    ("tunnel_name", "two words", "tunnel_name"),
    ("controller_timeout_seconds", "901", "controller_timeout_seconds"),
    ("tunnel_alarm_datapoints", "4", "tunnel_alarm_datapoints"),
    ("vpc_cidr", "10.0.0.0/8", "vpc_cidr"),
    ("vpc_cidr", "10.90.0.0/16", "gateway_subnet_cidr"),
    ("controller_max_attempts", "50", "queue_max_receive_count"),
    ("queue_max_receive_count", "8", "controller_max_attempts"),
    ("controller_batch_size", "0", "controller_batch_size"),
    ("controller_batch_window_seconds", "301", "controller_batch_window_seconds"),
    ("health_interval_seconds", "5", "health_interval_seconds"),
    ("health_interval_seconds", "120", "tunnel_alarm_period_seconds"),
    ("health_probe_target", "198.51.100.5:443", "health_probe_source"),
    ("health_probe_target", "198.51.100.5", "health_probe_target"),
    ("health_probe_source", "not-an-ip", "health_probe_source"),
    ("healer_backoff_factor", "0.5", "healer_backoff_factor"),
    ("healer_backoff_max_seconds", "30", "healer_backoff_base_seconds"),
    ("healer_max_restarts", "0", "healer_max_restarts"),
    ("healer_window_seconds", "30", "healer_window_seconds"),
    ("healer_restart_wait_seconds", "121", "healer_restart_wait_seconds"),
    ("healer_command_timeout_seconds", "40", "healer_restart_wait_seconds"),
    ("healer_sweep_schedule", "every minute", "healer_sweep_schedule"),
    # Addresses that cannot work (issue 14, finding 8); the example's T is 203.0.113.1, G
    # 10.80.0.10, the VPC 10.80.0.0/16.
    ("partner_endpoint", "0.0.0.0", "partner_endpoint 0.0.0.0 is in 0.0.0.0/8"),
    ("partner_endpoint", "224.0.0.5", "partner_endpoint 224.0.0.5 is in 224.0.0.0/4, multicast"),
    ("partner_endpoint", "10.80.0.20", "partner_endpoint 10.80.0.20 lies inside gateway_subnet"),
    ("partner_endpoint", "10.80.9.9", "partner_endpoint 10.80.9.9 lies inside vpc_cidr"),
    ("address_pool", "192.0.2.10,203.0.113.1", "address_pool 203.0.113.1 is partner_endpoint"),
    ("address_pool", "10.80.0.10", "address_pool 10.80.0.10 is gateway_private_ip"),
    ("address_pool", "10.80.0.11", "address_pool 10.80.0.11 lies inside gateway_subnet_cidr"),
    ("address_pool", "10.99.0.1", "address_pool 10.99.0.1 is in 10.0.0.0/8, private (RFC 1918)"),
    ("address_pool", "172.31.0.1", "address_pool 172.31.0.1 is in 172.16.0.0/12, private"),
    ("address_pool", "192.168.1.1", "address_pool 192.168.1.1 is in 192.168.0.0/16, private"),
    ("address_pool", "100.64.0.1", "address_pool 100.64.0.1 is in 100.64.0.0/10, shared address"),
    ("address_pool", "127.0.0.1", "address_pool 127.0.0.1 is in 127.0.0.0/8, loopback"),
    ("address_pool", "169.254.169.254", "address_pool 169.254.169.254 is in 169.254.0.0/16"),
    ("address_pool", "0.0.0.0", "address_pool 0.0.0.0 is in 0.0.0.0/8"),
    ("address_pool", "239.1.1.1", "address_pool 239.1.1.1 is in 224.0.0.0/4, multicast"),
    ("address_pool", "255.255.255.255", "address_pool 255.255.255.255 is in 240.0.0.0/4"),
    ("partner_networks", "0.0.0.0/0", "partner_networks 0.0.0.0/0 is the default route"),
    ("partner_networks", "169.254.169.254/32", "overlaps 169.254.0.0/16"),
    ("partner_networks", "10.80.128.0/24", "partner_networks 10.80.128.0/24 overlaps vpc_cidr"),
]

# Valid alone, wrong together with the rest of the configuration.
EIP = "eipalloc-0123456789abcdef0"
PUBLIC_VPC = {
    "vpc_cidr": "203.0.113.0/24",
    "gateway_subnet_cidr": "203.0.113.0/26",
    "gateway_private_ip": "203.0.113.10",
    "partner_endpoint": "198.51.100.200",
}
BAD_TOGETHER = [
    (
        PUBLIC_VPC | {"address_pool": "192.0.2.10,203.0.113.200"},
        "address_pool 203.0.113.200 lies inside vpc_cidr 203.0.113.0/24",
    ),
    (
        {"nat_mode": "shared", "shared_address": "10.0.0.1", "address_pool": ""},
        "shared_address 10.0.0.1 is in 10.0.0.0/8, private (RFC 1918)",
    ),
    (
        {"nat_mode": "shared", "shared_address": "203.0.113.1", "address_pool": ""},
        "shared_address 203.0.113.1 is partner_endpoint",
    ),
    (
        {"gateway_eip_allocation_id": EIP, "gateway_eip_address": "203.0.113.1"},
        "gateway_eip_address 203.0.113.1 is partner_endpoint",
    ),
    (
        {"gateway_eip_allocation_id": EIP, "gateway_eip_address": "172.16.5.5"},
        "gateway_eip_address 172.16.5.5 is in 172.16.0.0/12, private (RFC 1918)",
    ),
    (
        {"gateway_eip_allocation_id": EIP, "gateway_eip_address": "10.80.1.1"},
        "gateway_eip_address 10.80.1.1 lies inside vpc_cidr 10.80.0.0/16",
    ),
    (
        {"health_probe_target": "203.0.113.7:443", "health_probe_source": "192.0.2.10"},
        "health_probe_target: 203.0.113.7 is not inside partner_networks",
    ),
    (
        {"health_probe_target": "198.51.100.5:443", "health_probe_source": "192.0.2.99"},
        "health_probe_source: 192.0.2.99 is not one of our public addresses",
    ),
    (
        {"health_probe_target": "198.51.100.5:70000", "health_probe_source": "192.0.2.10"},
        "port 70000",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_TOGETHER, ids=[m for _, m in BAD_TOGETHER])
def test_inconsistent_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(example_context(overrides))


@pytest.mark.parametrize(("key", "value", "named"), BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_value_names_its_key(key, value, named):
    context = example_context({key: value})
    with pytest.raises(ConfigError) as caught:
        load_settings(context)
    message = str(caught.value)
    assert message.startswith("invalid CDK context:")
    assert named in message


def test_a_misspelt_key_is_an_error_with_a_suggestion():
    context = example_context({"partner_endpont": "203.0.113.9"})
    with pytest.raises(
        ConfigError, match=r"partner_endpont: unknown .*did you mean partner_endpoint"
    ):
        load_settings(context)


def test_the_gateway_pair_key_is_ours_and_checked():
    assert load_settings(example_context()).stack.gateway_pair is True
    for value, expected in (("false", False), (False, False), ("true", True)):
        settings = load_settings(example_context({"tunnelnat:gatewayPair": value}))
        assert settings.stack.gateway_pair is expected
    # The field's own name is not a context key; a misspelt namespaced key is not ignored.
    with pytest.raises(
        ConfigError, match=r"gateway_pair: unknown .*did you mean tunnelnat:gatewayPair"
    ):
        load_settings(example_context({"gateway_pair": False}))
    with pytest.raises(
        ConfigError, match=r"tunnelnat:gatewaypair: unknown .*tunnelnat:gatewayPair"
    ):
        load_settings(example_context({"tunnelnat:gatewaypair": False}))


def test_cdk_own_context_keys_are_not_ours_to_judge():
    context = example_context(
        {
            "@aws-cdk/core:newStyleStackSynthesis": True,
            "aws:cdk:enable-path-metadata": True,
            "acknowledged-issue-numbers": [1234],
        }
    )
    assert load_settings(context).stack.deployment == "tunnelnat"


def test_every_problem_is_reported_at_once_each_naming_its_keys():
    context = example_context(
        {"partner_endpoint": "0.0.0.0", "address_pool": "10.80.0.10,10.1.1.1"}
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(context)
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid CDK context:"
    assert [line.split(" ", 3)[2] for line in lines[1:]] == [
        "partner_endpoint",
        "address_pool",
        "address_pool",
    ]
    assert "Value error" not in str(caught.value) and "(model)" not in str(caught.value)


def test_documentation_ranges_and_real_public_addresses_are_accepted():
    # RFC 5737's ranges are what the lab, the tests and the examples use; AWS never hands them
    # out, so allowing them lets nothing real through by accident.
    for pool in ("192.0.2.10", "198.51.100.100", "203.0.113.99", "52.95.110.1,3.5.140.2"):
        settings = load_settings(example_context({"address_pool": pool}))
        assert ",".join(map(str, settings.config.address_pool)) == pool
    # A partner reached over private connectivity (Direct Connect, a transit gateway) may have
    # a private T, as long as it is not inside our VPC.
    assert (
        str(
            load_settings(
                example_context({"partner_endpoint": "172.20.0.1"})
            ).config.partner_endpoint
        )
        == "172.20.0.1"
    )


@pytest.mark.parametrize("key", sorted(EXAMPLE_CONTEXT))
def test_a_missing_required_value_is_named(key):
    context = {k: v for k, v in example_context().items() if k != key}
    with pytest.raises(ConfigError) as caught:
        load_settings(context)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"  {key}: missing; "), lines


def test_cdk_json_alone_fails_listing_every_required_key():
    """A deploy that forgets the -c keys stops, naming each, instead of using an example."""
    with pytest.raises(ConfigError) as caught:
        load_settings(cdk_json_context())
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("invalid CDK context: required keys missing")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "partner_endpoint",
        "partner_networks",
        "gateway_subnet_cidr",
        "gateway_private_ip",
        "address_pool",
    ]
    assert missing_keys({"nat_mode": "shared"})[-1] == "shared_address"
    assert missing_keys(EXAMPLE_CONTEXT) == []
    assert set(missing_keys({})) == set(REQUIRED_KEYS) | {"address_pool"}
    # An empty value (`-c address_pool=`) is as missing as an absent one.
    assert missing_keys(EXAMPLE_CONTEXT | {"address_pool": ""}) == ["address_pool"]


def test_csv_strings_from_the_command_line_are_accepted():
    context = example_context(
        {
            "partner_networks": "198.51.100.0/28, 198.51.100.64/27",
            "address_pool": "192.0.2.10,192.0.2.11",
            "tunnel_mss": "1300",
        }
    )
    settings = load_settings(context)
    assert len(settings.config.partner_networks) == 2
    assert settings.config.tunnel_mss == 1300


def test_build_app_raises_before_building_anything():
    with pytest.raises(ConfigError, match="partner_endpoint"):
        build_app(example_context({"partner_endpoint": "300.1.1.1"}), nag=False)


def _app_py(*context: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *(f"-c{item}" for item in context)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"},
    )


def _as_cli(context: dict) -> list[str]:
    return [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in context.items()]


def test_app_py_exits_2_with_the_message_and_no_traceback():
    bad = EXAMPLE_CONTEXT | {"partner_endpoint": "203.0.113.999"}
    result = _app_py(*_as_cli(bad))
    assert result.returncode == 2, result.stderr
    assert "partner_endpoint" in result.stderr
    assert "Traceback" not in result.stderr
    # Without the required -c keys (cdk.json has none) it stops and lists them.
    result = _app_py()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for key in (*REQUIRED_KEYS, "address_pool"):
        assert f"  {key}: missing" in result.stderr


# -- the documents the stack passes parameters to must accept them ---------------------------


def _documents_without(tmp_path, stem):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    (target / f"{stem}.yaml").unlink()
    return target


def test_a_missing_configure_gateway_document_fails_synthesis(tmp_path):
    documents = _documents_without(tmp_path, "ConfigureGateway")
    with pytest.raises(DocumentError, match="ConfigureGateway.yaml is missing"):
        build_app(example_context(), outdir=str(tmp_path / "out"), documents_dir=documents)


def test_a_parameter_the_document_does_not_allow_fails_synthesis(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    path = target / "ConfigureTunnel.yaml"
    content = yaml.safe_load(path.read_text())
    content["parameters"]["TunnelName"]["allowedPattern"] = "^only-this$"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(DocumentError, match="TunnelName='partner' does not match"):
        build_app(example_context(), outdir=str(tmp_path / "out"), documents_dir=target)


def test_a_document_over_ssms_size_limit_fails_synthesis(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    path = target / "RestartTunnel.yaml"
    content = yaml.safe_load(path.read_text())
    content["description"] = "x" * (64 * 1024)
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(DocumentError, match=r"RestartTunnel.yaml: \d+ bytes as deployed, over"):
        build_app(example_context(), outdir=str(tmp_path / "out"), documents_dir=target)


# -- cdk.json and docs/stack.md agree with the code ------------------------------------------


def test_cdk_json_runs_the_app_and_holds_no_partner_or_addresses():
    cdk_json = json.loads((ROOT / "cdk.json").read_text())
    assert cdk_json["app"].endswith("app.py")
    assert cdk_json["notices"] is False  # the CLI contacts nothing to fetch notices
    ours = {k for k in cdk_json["context"] if not k.startswith("@aws-cdk")}
    assert ours <= set(ALL_KEYS)
    assert not ours & {*REQUIRED_KEYS, "address_pool", "shared_address"}
    load_settings(cdk_json["context"] | EXAMPLE_CONTEXT)  # with the example, it is valid


def test_make_synth_and_the_docs_pass_the_example_explicitly():
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^SYNTH_CONTEXT \?=((?:.*\\\n)*.*)$", makefile, flags=re.MULTILINE)
    assert block, "Makefile: SYNTH_CONTEXT"
    given = dict(re.findall(r"-c ([a-z_]+)=(\S+)", block.group(1)))
    assert given == dict(item.split("=", 1) for item in _as_cli(EXAMPLE_CONTEXT))
    assert re.search(r"^synth:.*\n\t\$\(PY\) app\.py \$\(SYNTH_CONTEXT\)$", makefile, re.MULTILINE)
    deploy = (ROOT / "docs" / "stack.md").read_text().split("npx aws-cdk@2 deploy", 1)[1]
    documented = dict(re.findall(r"-c ([a-z_]+)=(\S+)", deploy.split("```", 1)[0]))
    assert set(missing_keys(documented)) == set(), documented


@pytest.fixture(scope="module")
def flag_report(tmp_path_factory):
    """The feature-flag report the CDK writes into the cloud assembly (what `cdk flags` reads)."""
    outdir = tmp_path_factory.mktemp("cdk.out")
    app, _ = build_app(example_context(), outdir=str(outdir), nag=False)
    app.synth()
    manifest = json.loads((outdir / "manifest.json").read_text())
    [report] = [a for a in manifest["artifacts"].values() if a["type"] == "cdk:feature-flag-report"]
    return report["properties"]["flags"]


def test_no_feature_flag_is_left_unconfigured(flag_report):
    """As after a current `cdk init`: every flag whose unset behaviour is not the recommended one
    is set in cdk.json (the CLI calls the others "unconfigured" and warns on every synth). Unset,
    a flag behaves as its report's ``unconfiguredBehavesLike`` says, or is off."""
    unconfigured = [
        name
        for name, flag in flag_report.items()
        if "userValue" not in flag
        and "recommendedValue" in flag
        and flag.get("unconfiguredBehavesLike", {}).get("v2", False) != flag["recommendedValue"]
    ]
    assert unconfigured == []
    flags = {k: v for k, v in cdk_json_context().items() if k.startswith("@aws-cdk")}
    assert flags, "cdk.json sets no feature flag"
    for name, value in flags.items():
        assert name in flag_report, f"{name}: not a flag this aws-cdk-lib knows"
        assert flag_report[name]["userValue"] == value == flag_report[name]["recommendedValue"]


def test_every_context_key_is_documented():
    text = (ROOT / "docs" / "stack.md").read_text()
    documented = set(
        re.findall(r"^\| `([a-z_]+|tunnelnat:[A-Za-z]+)` \|", text, flags=re.MULTILINE)
    )
    assert documented == set(ALL_KEYS)
