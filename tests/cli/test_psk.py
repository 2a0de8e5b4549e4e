"""``tunnelnat psk set`` against moto: the key goes into the secret and nowhere else; ``--wait``
follows what the stack's PskRollout rule does (simulated here: moto runs no EventBridge target),
a ConfigureTunnel command on the gateway, then TunnelUp."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest
from botocore.stub import Stubber

from tests.cli.conftest import BASE, DEPLOYMENT, Result
from tunnelnat_cli import Runtime, main
from tunnelnat_cli.psk import SCHEMA

KEY = "correct-horse-battery-staple-2026"
GATEWAY_TAG = "tunnelnat:gateway"
DOCUMENT = f"{DEPLOYMENT}-ConfigureTunnel"
EARLIER = f"{DEPLOYMENT}-ConfigureGateway"  # a stack deployed before ConfigureTunnel existed


class Stdin(io.StringIO):
    def __init__(self, text: str, *, tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def psk(dep):
    """The deployment's secret (random, as the stack creates it) and the gateway's rollout tag."""
    client = dep.session.client("secretsmanager", endpoint_url=dep.url)
    client.create_secret(Name=f"{DEPLOYMENT}-psk", SecretString="r4nd0m-initial-value-xxxxxxxxxx")
    dep.ec2.create_tags(
        Resources=[dep.gateway_id], Tags=[{"Key": GATEWAY_TAG, "Value": DEPLOYMENT}]
    )
    # A gateway launched after the change would count as configured by its association: the
    # change here comes later (Secrets Manager's dates have whole seconds in moto).
    time.sleep(1.1)
    return client


def current(psk) -> str:
    return psk.get_secret_value(SecretId=f"{DEPLOYMENT}-psk")["SecretString"]


def fake_now(dep):
    """Wall-clock time that moves with the fake clock's sleeps (TunnelUp counts in minutes)."""
    base, start = time.time(), dep.clock.t
    return lambda: base + (dep.clock.t - start)


def run(dep, *argv, stdin="", tty=False, prompts=(), after=None, sleep=None, now=None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    answers = list(prompts)
    runtime = Runtime(
        now=now or fake_now(dep),
        out=out,
        err=err,
        stdin=Stdin(stdin, tty=tty),
        getpass=lambda prompt: answers.pop(0),
        clients=dict(dep.clients),
        after_change=after,
        sleep=sleep or dep.clock.sleep,
        monotonic=dep.clock.monotonic,
        session=dep.session,
    )
    code = main([*argv, *BASE], runtime)
    return Result(code, out.getvalue(), err.getvalue())


class Rule:
    """What PskRollout does in AWS, a few polls late: send ConfigureTunnel to the instances with
    the gateway tag; then the gateway's health agent reports the tunnel at every poll."""

    def __init__(self, dep, *, tunnel_up: float = 1, delay_polls: int = 1) -> None:
        self.dep, self.tunnel_up, self.delay = dep, tunnel_up, delay_polls
        self.now = fake_now(dep)
        self.changes: list = []
        self.polls = 0
        self.sent: list[str] = []

    def after_change(self, aws, change) -> None:
        assert change.action == "psk" and change.instance_ids == ()
        self.changes.append(change)

    def sleep(self, seconds: float) -> None:
        self.dep.clock.sleep(seconds)
        self.polls += 1
        if self.changes and self.polls == self.delay:
            ssm = self.dep.session.client("ssm", endpoint_url=self.dep.url)
            reply = ssm.send_command(
                DocumentName=DOCUMENT,
                Targets=[{"Key": f"tag:{GATEWAY_TAG}", "Values": [DEPLOYMENT]}],
                Parameters={"PskSecretName": [self.changes[0].message["secret"]]},
            )
            self.sent.append(reply["Command"]["CommandId"])
        if self.sent and self.polls > self.delay:
            self.dep.cloudwatch.put_metric_data(
                Namespace=f"tunnelnat/{DEPLOYMENT}",
                MetricData=[
                    {
                        "MetricName": "TunnelUp",
                        "Dimensions": [
                            {"Name": "Tunnel", "Value": "partner"},
                            {"Name": "Gateway", "Value": self.dep.gateway_id},
                        ],
                        "Value": self.tunnel_up,
                        "Timestamp": datetime.fromtimestamp(self.now(), UTC),
                    }
                ],
            )


# -- the key goes into the secret, and nowhere else ------------------------------------------------
def test_set_from_stdin_stores_the_key_and_never_shows_it(dep, psk):
    result = run(dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", stdin=KEY + "\n")
    assert result.code == 0, result.err
    assert current(psk) == KEY, "one final line break is not part of the key"
    assert f"stored a new version of {DEPLOYMENT}-psk" in result.out
    assert KEY not in result.out + result.err


def test_set_from_a_file_with_the_secret_named_by_the_stack(dep, psk, tmp_path):
    key_file = tmp_path / "psk"
    key_file.write_text(KEY + "\r\n")
    template = {
        "Resources": {"Handle": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
        "Outputs": {"PskSecretName": {"Value": f"{DEPLOYMENT}-psk"}},
    }
    dep.session.client("cloudformation", endpoint_url=dep.url).create_stack(
        StackName="tn", TemplateBody=json.dumps(template)
    )
    result = run(dep, "psk", "set", "--file", str(key_file), "--stack", "tn", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    jsonschema.validate(doc, SCHEMA)
    assert doc["result"] == "stored" and doc["secret"] == f"{DEPLOYMENT}-psk"
    assert current(psk) == KEY
    assert KEY not in result.out + result.err


def test_on_a_terminal_the_key_is_asked_twice_without_echo(dep, psk):
    result = run(dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", tty=True, prompts=[KEY, KEY])
    assert result.code == 0, result.err
    assert current(psk) == KEY
    before = current(psk)
    result = run(
        dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", tty=True, prompts=[KEY, KEY + "x"]
    )
    assert result.code == 2
    assert result.err == "tunnelnat: the two entries differ: nothing was changed\n"
    assert current(psk) == before


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("", "no pre-shared key given"),
        ("\n", "no pre-shared key given"),
        ("short-key", "is 9 characters long; at least 20 are needed"),
        ("first-half-of-the-key\nsecond-half-of-it", "has a line break inside"),
        ("a-key-with-a-carriage\rreturn-inside", "has a line break inside"),
        (" a-key-that-starts-with-a-space", "starts or ends with a space"),
        ("a-key-that-ends-with-a-tab-xx\t", "starts or ends with a space"),
        ("a-key-with-a-\x07-bell-inside-it", "contains control characters"),
    ],
)
def test_a_bad_key_changes_nothing_and_is_not_shown(dep, psk, key, expected):
    before = current(psk)
    result = run(dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", stdin=key)
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1 and expected in result.err, result.err
    assert current(psk) == before
    if key.strip():
        assert key.strip() not in result.err


def test_the_key_is_never_an_argument_and_a_stray_one_is_not_echoed(dep, psk):
    before = current(psk)
    result = run(dep, "psk", "set", KEY, "--secret", f"{DEPLOYMENT}-psk")
    assert result.code == 2 and result.err.count("\n") == 1
    assert "a key is never given as an argument" in result.err
    assert KEY not in result.err + result.out
    assert current(psk) == before


def test_file_problems_are_one_line(dep, psk, tmp_path):
    result = run(dep, "psk", "set", "--file", str(tmp_path / "missing"), "--secret", "x-psk")
    assert result.code == 2 and result.err.count("\n") == 1
    assert "cannot read --file" in result.err and "No such file" in result.err
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" * 20)
    result = run(dep, "psk", "set", "--file", str(binary), "--secret", "x-psk")
    assert result.code == 2 and "not UTF-8" in result.err


def test_an_unknown_secret_is_one_line(dep, psk):
    result = run(dep, "psk", "set", "--secret", "nope", stdin=KEY)
    assert result.code == 2 and result.err == (
        "tunnelnat: secret 'nope' not found in region us-east-1: check --secret, --stack and "
        "--region\n"
    )
    result = run(dep, "psk", "set", "--secret", "not a name;rm -rf", stdin=KEY)
    assert result.code == 2 and "not a secret name" in result.err


def test_by_default_the_secret_is_the_one_the_association_reads(dep, psk):
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stubber = Stubber(ssm)  # moto has no State Manager associations
    stubber.add_response(
        "list_associations",
        {"Associations": [{"AssociationId": "11111111-2222-3333-4444-555555555555"}]},
        {"AssociationFilterList": [{"key": "AssociationName", "value": DOCUMENT}]},
    )
    stubber.add_response(
        "describe_association",
        {
            "AssociationDescription": {
                "Name": DOCUMENT,
                "Parameters": {"PskSecretName": [f"{DEPLOYMENT}-psk"], "TunnelName": ["p"]},
            }
        },
        {"AssociationId": "11111111-2222-3333-4444-555555555555"},
    )
    stubber.activate()
    dep.clients["ssm"] = ssm
    result = run(dep, "psk", "set", stdin=KEY)
    assert result.code == 0, result.err
    assert current(psk) == KEY
    stubber.assert_no_pending_responses()


def test_a_stack_from_before_configure_tunnel_is_read_from_configure_gateways(dep, psk):
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stubber = Stubber(ssm)
    stubber.add_response(
        "list_associations",
        {"Associations": []},
        {"AssociationFilterList": [{"key": "AssociationName", "value": DOCUMENT}]},
    )
    stubber.add_response(
        "list_associations",
        {"Associations": [{"AssociationId": "11111111-2222-3333-4444-666666666666"}]},
        {"AssociationFilterList": [{"key": "AssociationName", "value": EARLIER}]},
    )
    stubber.add_response(
        "describe_association",
        {
            "AssociationDescription": {
                "Name": EARLIER,
                "Parameters": {"PskSecretName": [f"{DEPLOYMENT}-psk"]},
            }
        },
        {"AssociationId": "11111111-2222-3333-4444-666666666666"},
    )
    stubber.activate()
    dep.clients["ssm"] = ssm
    result = run(dep, "psk", "set", stdin=KEY)
    assert result.code == 0, result.err
    assert current(psk) == KEY
    stubber.assert_no_pending_responses()


def test_without_any_way_to_find_the_secret_it_says_what_to_pass(dep, psk):
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stubber = Stubber(ssm)
    stubber.add_response("list_associations", {"Associations": []})
    stubber.add_response("list_associations", {"Associations": []})
    stubber.activate()
    dep.clients["ssm"] = ssm
    result = run(dep, "psk", "set", stdin=KEY)
    assert result.code == 2 and result.err == (
        f"tunnelnat: cannot tell which secret holds the PSK (no {DOCUMENT} association found): "
        "pass --stack STACK (its PskSecretName output) or --secret NAME; with a partners file, "
        "--partner NAME\n"
    )


# -- --wait: ConfigureTunnel on the gateway after the change, then the tunnel --------------------
def test_wait_follows_the_rule_to_the_tunnel(dep, psk):
    rule = Rule(dep)
    result = run(
        dep,
        "psk",
        "set",
        "--secret",
        f"{DEPLOYMENT}-psk",
        "--wait",
        "--interval",
        "10",
        stdin=KEY,
        after=rule.after_change,
        sleep=rule.sleep,
        now=rule.now,
    )
    assert result.code == 0, result.err
    assert len(rule.sent) == 1
    assert f"{dep.gateway_id} ran ConfigureTunnel with the new key and reports partner up" in (
        result.out
    )
    assert f"{dep.gateway_id}: waiting for EventBridge to start ConfigureTunnel" in result.err
    assert "ConfigureTunnel done; waiting for TunnelUp=1" in result.err
    assert KEY not in result.out + result.err
    [change] = rule.changes
    assert change.message["secret"] == f"{DEPLOYMENT}-psk"


def test_wait_json(dep, psk):
    rule = Rule(dep, delay_polls=2)
    result = run(
        dep,
        "psk",
        "set",
        "--secret",
        f"{DEPLOYMENT}-psk",
        "--wait",
        "--json",
        stdin=KEY,
        after=rule.after_change,
        sleep=rule.sleep,
        now=rule.now,
    )
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    jsonschema.validate(doc, SCHEMA)
    assert doc["result"] == "ready" and doc["gateway_id"] == dep.gateway_id
    assert doc["command_id"] == rule.sent[0] and doc["command_status"] == "Success"
    assert doc["tunnels"] == [{"tunnel": "partner", "state": "up"}]


def test_wait_times_out_when_nothing_runs_configure_gateway(dep, psk):
    result = run(
        dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", "--wait", "--timeout", "60", stdin=KEY
    )
    assert result.code == 1
    assert "timed out after 60s; last: " in result.err
    assert "waiting for EventBridge to start ConfigureTunnel" in result.err
    assert "fix: check the EventBridge rule of the stack's PskRollout" in result.err
    assert current(psk) == KEY, "the key is stored all the same"


def test_an_old_configure_gateway_run_does_not_count(dep, psk):
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    ssm.send_command(
        DocumentName=DOCUMENT, Targets=[{"Key": f"tag:{GATEWAY_TAG}", "Values": [DEPLOYMENT]}]
    )
    time.sleep(1.1)  # before the change below (Secrets Manager's dates: whole seconds in moto)
    result = run(
        dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", "--wait", "--timeout", "20", stdin=KEY
    )
    assert result.code == 1 and "waiting for EventBridge" in result.err


def test_wait_says_so_when_the_tunnel_stays_down(dep, psk):
    rule = Rule(dep, tunnel_up=0)
    result = run(
        dep,
        "psk",
        "set",
        "--secret",
        f"{DEPLOYMENT}-psk",
        "--wait",
        "--timeout",
        "300",
        stdin=KEY,
        after=rule.after_change,
        sleep=rule.sleep,
        now=rule.now,
    )
    assert result.code == 1
    assert "ConfigureTunnel done; waiting for TunnelUp=1 reported after it (now: partner down)" in (
        result.err
    )
    assert (
        "fix: the tunnel is not up with the new key: check that the partner uses the same key"
        in (result.err)
    )


def test_wait_reports_a_failed_configure_gateway_in_one_line(dep, psk):
    """moto reports every command Success: the failure comes from a stubbed SSM."""
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stubber = Stubber(ssm)
    stubber.add_response(
        "list_commands",
        {
            "Commands": [
                {
                    "CommandId": "0b1c2d3e-aaaa-bbbb-cccc-000000000001",
                    "DocumentName": DOCUMENT,
                    "RequestedDateTime": datetime.now(UTC) + timedelta(seconds=5),
                    "Status": "Failed",
                }
            ]
        },
    )
    stubber.add_response(
        "get_command_invocation",
        {
            "CommandId": "0b1c2d3e-aaaa-bbbb-cccc-000000000001",
            "InstanceId": dep.gateway_id,
            "Status": "Failed",
            "StatusDetails": "Failed",
            "StandardErrorContent": "loading...\nConfigureTunnel: swanctl --load-all failed\n",
        },
        {"CommandId": "0b1c2d3e-aaaa-bbbb-cccc-000000000001", "InstanceId": dep.gateway_id},
    )
    stubber.activate()
    dep.clients["ssm"] = ssm
    result = run(dep, "psk", "set", "--secret", f"{DEPLOYMENT}-psk", "--wait", stdin=KEY)
    assert result.code == 1
    assert result.err.splitlines()[-2] == (
        f"ConfigureTunnel Failed on {dep.gateway_id} (command "
        "0b1c2d3e-aaaa-bbbb-cccc-000000000001): ConfigureTunnel: swanctl --load-all failed"
    )
    assert result.err.splitlines()[-1].startswith("  fix: aws ssm get-command-invocation")


# -- several partners: one partner's key, its association, its tunnel ----------------------------
def test_a_partners_key_is_found_through_its_own_association(dep, psk):
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stubber = Stubber(ssm)  # moto has no State Manager associations
    stubber.add_response(
        "list_associations",
        {"Associations": [{"AssociationId": "11111111-2222-3333-4444-777777777777"}]},
        {"AssociationFilterList": [{"key": "AssociationName", "value": f"{DOCUMENT}-bank"}]},
    )
    stubber.add_response(
        "describe_association",
        {
            "AssociationDescription": {
                "Name": DOCUMENT,
                "Parameters": {"PskSecretName": [f"{DEPLOYMENT}-psk"], "TunnelName": ["bank"]},
            }
        },
        {"AssociationId": "11111111-2222-3333-4444-777777777777"},
    )
    stubber.activate()
    dep.clients["ssm"] = ssm
    result = run(dep, "psk", "set", "--partner", "bank", stdin=KEY)
    assert result.code == 0, result.err
    assert current(psk) == KEY
    stubber.assert_no_pending_responses()


def test_a_bad_partner_name_changes_nothing(dep, psk):
    result = run(dep, "psk", "set", "--partner", "Bank;x", stdin=KEY)
    assert result.code == 2 and "--partner 'Bank;x': not a partner name" in result.err
    assert current(psk) != KEY


class PartnerRule(Rule):
    """Several partners: the rule re-runs only the changed partner's ConfigureTunnel (its
    TunnelName); another partner's run and its tunnel, down, must not decide the outcome."""

    def sleep(self, seconds: float) -> None:
        self.dep.clock.sleep(seconds)
        self.polls += 1
        ssm = self.dep.session.client("ssm", endpoint_url=self.dep.url)
        target = [{"Key": f"tag:{GATEWAY_TAG}", "Values": [DEPLOYMENT]}]
        if self.changes and self.polls == self.delay:
            for tunnel in ("bank", "card"):  # card's run is newer: it must not count for bank
                reply = ssm.send_command(
                    DocumentName=DOCUMENT, Targets=target, Parameters={"TunnelName": [tunnel]}
                )
                self.sent.append((tunnel, reply["Command"]["CommandId"]))
        if self.sent and self.polls > self.delay:
            for tunnel, up in (("bank", 1), ("card", 0)):
                self.dep.cloudwatch.put_metric_data(
                    Namespace=f"tunnelnat/{DEPLOYMENT}",
                    MetricData=[
                        {
                            "MetricName": "TunnelUp",
                            "Dimensions": [
                                {"Name": "Tunnel", "Value": tunnel},
                                {"Name": "Gateway", "Value": self.dep.gateway_id},
                            ],
                            "Value": up,
                            "Timestamp": datetime.fromtimestamp(self.now(), UTC),
                        }
                    ],
                )


def test_wait_follows_one_partners_run_and_tunnel_only(dep, psk):
    rule = PartnerRule(dep)
    result = run(
        dep,
        "psk",
        "set",
        "--secret",
        f"{DEPLOYMENT}-psk",
        "--partner",
        "bank",
        "--wait",
        "--json",
        stdin=KEY,
        after=rule.after_change,
        sleep=rule.sleep,
        now=rule.now,
    )
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["result"] == "ready"
    assert doc["command_id"] == dict(rule.sent)["bank"]
    assert doc["tunnels"] == [{"tunnel": "bank", "state": "up"}]
