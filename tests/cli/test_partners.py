"""``tunnelnat partners check``: the plan or every problem, exit codes, the JSON schema, and no
AWS at all (no credentials, no region, no endpoint)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.unit.test_partners_file import THREE
from tunnelnat_cli import Runtime, main
from tunnelnat_cli.schemas import PARTNERS

REPO = Path(__file__).resolve().parents[2]
PLACE = ["--vpc-cidr", "10.80.0.0/16", "--gateway-subnet", "10.80.0.0/24"]


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def run(*argv: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), Runtime(out=out, err=err))
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """Nothing AWS could use: no credentials, no region, no config files, no metadata."""
    for name in list(os.environ):
        # TUNNELNAT_*: the deployment (and so the tag keys) comes from the options alone here,
        # whatever an earlier test on this worker left in the environment.
        if name.startswith(("AWS_", "TUNNELNAT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "partners.yaml"
    path.write_text(yaml.safe_dump(THREE, sort_keys=False))
    return path


@pytest.fixture
def bad(tmp_path) -> Path:
    values = json.loads(json.dumps(THREE))
    del values["alias_block"]
    values["partners"][1]["name"] = "aws-peer"
    values["partners"][2]["nat"]["pool"] = ["10.80.0.9"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_plan(no_aws, good):
    result = run("partners", "check", str(good), *PLACE)
    assert result.code == 0, result.err
    assert result.err == ""
    lines = result.out.splitlines()
    assert lines[0] == (
        f"{good}: 3 partners, no problems (checked against VPC 10.80.0.0/16, gateway subnet "
        "10.80.0.0/24)"
    )
    assert lines[1] == "alias_block 100.64.0.0/10"
    header = lines[3].split()
    assert header[:3] == ["TUNNEL", "ENDPOINT", "IKE"]
    rows = [line.split() for line in lines[4:8]]
    assert rows[0] == [
        "aws-peer", "198.51.100.10", "IKEv2", "single", "10.0.0.0/24", "10.0.0.0/24",
        "dedicated", "203.0.113.10,203.0.113.11", "tunnelnat:partner:aws-peer",
    ]  # fmt: skip
    assert rows[1][:6] == ["bank", "198.51.100.20", "IKEv1", "per-pair", "172.20.0.0/24"] + [
        "172.20.0.0/24"
    ]
    assert rows[2][4:6] == ["172.20.5.0/28", "172.20.5.0/28"]
    assert rows[1][6:] == ["shared", "203.0.113.20", "tunnelnat:partner:bank"]
    assert rows[3][:7] == [
        "clearing", "192.0.2.30", "IKEv2", "single", "10.0.0.0/24", "100.64.0.0/24", "(chosen",
    ]  # fmt: skip
    assert "Not deployable yet" in result.out


def test_tag_key_follows_deployment_and_option(no_aws, good):
    out = run("--deployment", "payments", "partners", "check", str(good)).out
    assert "tunnelnat:payments:partner:bank" in out
    assert "not checked against our VPC" in out
    out = run("partners", "check", str(good), "--enrolment-tag-key", "team:vpn").out
    assert "team:vpn:partner:clearing" in out
    bad_key = run("partners", "check", str(good), "--enrolment-tag-key", "aws:x")
    assert bad_key.code == 2 and "no aws: prefix" in bad_key.err


def test_problems_exit_1_every_one_named(no_aws, bad):
    result = run("partners", "check", str(bad), *PLACE)
    assert result.code == 1
    assert result.out.splitlines() == [
        f"invalid partners file {bad}:",
        "  partners[1] (aws-peer).name: 'aws-peer' is also partners[0]'s: a name is a tunnel and "
        "a tag key, one partner each",
        "  partners[2] (clearing).nat.pool: 10.80.0.9 lies inside our VPC 10.80.0.0/16: S is an "
        "Elastic IP",
        "  partners[2] (clearing).networks[0]: 10.0.0.0/24 overlaps partners[0] (aws-peer)'s "
        "network 10.0.0.0/24: declare alias (a free range of the same size instances address "
        "this partner by) or set alias_block to choose one from",
    ]


def test_json_plan_matches_schema(no_aws, good):
    result = run("partners", "check", str(good), *PLACE, "--json")
    assert result.code == 0
    doc = json.loads(result.out)
    jsonschema.validate(doc, PARTNERS)
    assert doc["valid"] is True and doc["problems"] == []
    assert doc["vpc_cidrs"] == ["10.80.0.0/16"] and doc["gateway_subnet"] == "10.80.0.0/24"
    clearing = doc["partners"][2]
    assert clearing["networks"] == [
        {"real": "10.0.0.0/24", "local": "100.64.0.0/24", "alias": "chosen"}
    ]
    assert clearing["auth"] == "certificate" and clearing["tunnel"] == "clearing"
    assert clearing["tag_key"] == "tunnelnat:partner:clearing"
    assert doc["partners"][1]["ike_version"] == 1
    assert doc["partners"][1]["selector_layout"] == "per-pair"


def test_json_problems_match_schema(no_aws, bad):
    result = run("partners", "check", str(bad), *PLACE, "--json")
    assert result.code == 1
    doc = json.loads(result.out)
    jsonschema.validate(doc, PARTNERS)
    assert doc["valid"] is False and doc["partners"] == []
    assert len(doc["problems"]) == 3
    assert doc["problems"][0].startswith("partners[1] (aws-peer).name:")


def test_missing_file_is_exit_2_one_line(no_aws, tmp_path):
    result = run("partners", "check", str(tmp_path / "none.yaml"))
    assert result.code == 2 and result.out == ""
    assert result.err == f"tunnelnat: partners file {tmp_path / 'none.yaml'}: no such file\n"


def test_bad_yaml_is_exit_1(no_aws, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("partners: [\n  - name: x\n")
    result = run("partners", "check", str(path))
    assert result.code == 1
    assert result.out.startswith(f"partners file {path}: not valid YAML at line ")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--vpc-cidr", "10.80.0.1/16"], "'10.80.0.1/16' is not an IPv4 network"),
        (["--gateway-subnet", "nope"], "'nope' is not an IPv4 network"),
    ],
)
def test_bad_options_are_usage_errors(no_aws, good, argv, fragment):
    result = run("partners", "check", str(good), *argv)
    assert result.code == 2 and fragment in result.err and result.err.count("\n") == 1


def test_runs_without_any_aws_configuration(good, tmp_path):
    """The console entry point in a bare environment: no AWS_* at all, HOME without ~/.aws."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # never wait for IMDS, should anything look
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in ("lambdas", "cli"))
    proc = subprocess.run(
        [sys.executable, "-m", "tunnelnat_cli", "partners", "check", str(good), *PLACE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 partners, no problems" in proc.stdout


def test_vpc_cidr_repeats(no_aws, good):
    result = run(
        "partners", "check", str(good), "--vpc-cidr", "10.80.0.0/16", "--vpc-cidr", "10.0.0.0/16"
    )
    # aws-peer's network now overlaps our secondary CIDR: it takes the first alias.
    assert result.code == 0
    assert "10.0.0.0/24    100.64.0.0/24 (chosen alias)" in result.out


def test_docs_show_what_the_command_prints(no_aws, tmp_path, monkeypatch):
    """docs/partners.md's console block is this command's output for its example."""
    text = (REPO / "docs" / "partners.md").read_text()
    (tmp_path / "partners.yaml").write_text(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    monkeypatch.chdir(tmp_path)
    shown = text.split("```console\n", 1)[1].split("```", 1)[0].splitlines()
    assert shown[0] == "$ tunnelnat partners check partners.yaml " + " ".join(PLACE)
    result = run("partners", "check", "partners.yaml", *PLACE)
    assert result.code == 0
    assert result.out.splitlines()[: len(shown) - 1] == shown[1:]
