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
from stacks.settings import ALL_KEYS, load_settings
from tests.infra.conftest import DOCUMENTS_DIR, ROOT
from tunnelnat.core.config import ConfigError

BAD = [
    ("partner_endpoint", "not-an-ip", "partner_endpoint"),
    ("partner_networks", "198.51.100.0/33", "partner_networks"),
    ("nat_mode", "sometimes", "nat_mode"),
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
]

# Valid alone, wrong together with the rest of the configuration.
BAD_TOGETHER = [
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
        load_settings(cdk_json_context() | overrides)


@pytest.mark.parametrize(("key", "value", "named"), BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_value_names_its_key(key, value, named):
    context = cdk_json_context() | {key: value}
    with pytest.raises(ConfigError) as caught:
        load_settings(context)
    message = str(caught.value)
    assert message.startswith("invalid CDK context:")
    assert named in message


def test_a_misspelt_key_is_an_error_with_a_suggestion():
    context = cdk_json_context() | {"partner_endpont": "203.0.113.9"}
    with pytest.raises(
        ConfigError, match=r"partner_endpont: unknown .*did you mean partner_endpoint"
    ):
        load_settings(context)


def test_cdk_own_context_keys_are_not_ours_to_judge():
    context = cdk_json_context() | {
        "@aws-cdk/core:newStyleStackSynthesis": True,
        "aws:cdk:enable-path-metadata": True,
        "acknowledged-issue-numbers": [1234],
    }
    assert load_settings(context).stack.deployment == "tunnelnat"


def test_a_missing_required_value_is_named():
    context = {k: v for k, v in cdk_json_context().items() if k != "partner_endpoint"}
    with pytest.raises(ConfigError, match="partner_endpoint"):
        load_settings(context)


def test_csv_strings_from_the_command_line_are_accepted():
    context = cdk_json_context() | {
        "partner_networks": "198.51.100.0/28, 198.51.100.64/27",
        "address_pool": "192.0.2.10,192.0.2.11",
        "tunnel_mss": "1300",
    }
    settings = load_settings(context)
    assert len(settings.config.partner_networks) == 2
    assert settings.config.tunnel_mss == 1300


def test_build_app_raises_before_building_anything():
    with pytest.raises(ConfigError, match="partner_endpoint"):
        build_app(cdk_json_context() | {"partner_endpoint": "300.1.1.1"}, nag=False)


def test_app_py_exits_2_with_the_message_and_no_traceback():
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "-c", "partner_endpoint=203.0.113.999"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"},
    )
    assert result.returncode == 2, result.stderr
    assert "partner_endpoint" in result.stderr
    assert "Traceback" not in result.stderr


# -- the documents the stack passes parameters to must accept them ---------------------------


def _documents_without(tmp_path, stem):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    (target / f"{stem}.yaml").unlink()
    return target


def test_a_missing_configure_gateway_document_fails_synthesis(tmp_path):
    documents = _documents_without(tmp_path, "ConfigureGateway")
    with pytest.raises(DocumentError, match="ConfigureGateway.yaml is missing"):
        build_app(cdk_json_context(), outdir=str(tmp_path / "out"), documents_dir=documents)


def test_a_parameter_the_document_does_not_allow_fails_synthesis(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    path = target / "ConfigureGateway.yaml"
    content = yaml.safe_load(path.read_text())
    content["parameters"]["TunnelName"]["allowedPattern"] = "^only-this$"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(DocumentError, match="TunnelName='partner' does not match"):
        build_app(cdk_json_context(), outdir=str(tmp_path / "out"), documents_dir=target)


def test_a_document_over_ssms_size_limit_fails_synthesis(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    path = target / "RestartTunnel.yaml"
    content = yaml.safe_load(path.read_text())
    content["description"] = "x" * (64 * 1024)
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(DocumentError, match=r"RestartTunnel.yaml: \d+ bytes as deployed, over"):
        build_app(cdk_json_context(), outdir=str(tmp_path / "out"), documents_dir=target)


# -- cdk.json and docs/stack.md agree with the code ------------------------------------------


def test_cdk_json_runs_the_app_and_holds_only_known_keys():
    cdk_json = json.loads((ROOT / "cdk.json").read_text())
    assert cdk_json["app"].endswith("app.py")
    assert set(cdk_json["context"]) <= set(ALL_KEYS)
    load_settings(cdk_json["context"])  # the quick start is valid


def test_every_context_key_is_documented():
    text = (ROOT / "docs" / "stack.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))
    assert documented == set(ALL_KEYS)
