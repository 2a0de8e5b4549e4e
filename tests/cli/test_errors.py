"""Each failure an operator can hit is one line on stderr, with what to do, and exit code 2."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.stub import Stubber

from tests.cli.conftest import TABLE

REPO = Path(__file__).resolve().parents[2]


def one_line(result) -> str:
    assert result.code == 2, (result.out, result.err)
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
    assert result.out == ""
    return result.err


def test_missing_credentials(dep, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = one_line(dep.run("status", fresh=True))
    assert err == (
        "tunnelnat: no AWS credentials found: set AWS_PROFILE (or pass --profile), run "
        "`aws configure` or `aws sso login`, or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY\n"
    )


def test_unknown_profile(dep):
    err = one_line(dep.run("status", "--profile", "nope", fresh=True))
    assert err.startswith("tunnelnat: AWS client error: The config profile (nope) could not be")


def test_no_region(dep, monkeypatch):
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    err = one_line(dep.run("status", fresh=True))
    assert err == "tunnelnat: no AWS region configured: pass --region or set AWS_REGION\n"


def test_endpoint_unreachable(dep):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    err = one_line(dep.run("status", "--endpoint-url", f"http://127.0.0.1:{port}"))
    assert err.startswith(f"tunnelnat: cannot reach http://127.0.0.1:{port}/")
    assert "check --region (us-east-1) and --endpoint-url" in err


def test_table_missing(dep):
    err = one_line(dep.run("status", "--table", "nope", base=False))
    assert err == (
        "tunnelnat: DynamoDB table 'nope' not found in region us-east-1: pass --table (or set "
        "TUNNELNAT_TABLE_NAME) and check --region/--endpoint-url\n"
    )


def test_wrong_region_reads_as_a_missing_table_in_that_region(dep):
    err = one_line(dep.run("doctor", "--region", "eu-west-3"))
    assert f"DynamoDB table {TABLE!r} not found in region eu-west-3" in err


def test_invalid_region_name(dep):
    err = one_line(dep.run("status", "--region", "not a region", fresh=True))
    assert err.startswith("tunnelnat: AWS client error: Provided region_name 'not a region'")


def test_table_defaults_to_the_deployment_name(dep, monkeypatch):
    monkeypatch.delenv("TUNNELNAT_TABLE_NAME")
    err = one_line(dep.run("status", "--deployment", "payments", base=False))
    assert "DynamoDB table 'payments' not found" in err
    err = one_line(dep.run("status", base=False))
    assert "DynamoDB table 'test' not found" in err, "TUNNELNAT_DEPLOYMENT=test"


def test_table_name_from_the_environment(dep, monkeypatch):
    monkeypatch.setenv("TUNNELNAT_TABLE_NAME", "from-env")
    err = one_line(dep.run("status", base=False))
    assert "DynamoDB table 'from-env' not found" in err


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (
            "AccessDeniedException",
            "tunnelnat: permission denied for Query (AccessDeniedException): the caller's IAM "
            "policy must allow it; not allowed\n",
        ),
        (
            "UnrecognizedClientException",
            "tunnelnat: AWS rejected the credentials (UnrecognizedClientException): refresh them "
            "(`aws sso login`, a new session token) or pick another --profile\n",
        ),
        (
            "ThrottlingException",
            "tunnelnat: AWS error in Query: ThrottlingException: not allowed\n",
        ),
    ],
)
def test_aws_errors(dep, code, expected):
    dynamodb = dep.session.client("dynamodb", endpoint_url=dep.url)
    stubber = Stubber(dynamodb)
    stubber.add_client_error("query", service_error_code=code, service_message="not allowed")
    stubber.activate()
    dep.clients["dynamodb"] = dynamodb
    assert one_line(dep.run("status")) == expected


def test_debug_shows_the_traceback(dep):
    result = dep.run("status", "--table", "nope", "--debug", base=False)
    assert result.code == 2
    assert "Traceback" in result.err and "ResourceNotFoundException" in result.err
    assert result.err.rstrip().splitlines()[-1].startswith("tunnelnat: DynamoDB table 'nope'")


def test_usage_errors_are_exit_2(dep):
    result = dep.run("frobnicate", base=False)
    assert result.code == 2 and "invalid choice: 'frobnicate'" in result.err
    result = dep.run("enroll", base=False)
    assert result.code == 2 and "the following arguments are required: INSTANCE" in result.err
    result = dep.run("enroll", "i-0123456789abcdef0", "--timeout", "-1")
    assert result.code == 2 and "must be > 0" in result.err


def test_the_module_entry_point_runs_without_a_traceback(dep):
    env = {**os.environ, "PYTHONPATH": str(REPO / "lambdas")}
    proc = subprocess.run(
        [sys.executable, "-m", "tunnelnat_cli", "status", "--table", "missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("tunnelnat: DynamoDB table 'missing' not found")
    assert "Traceback" not in proc.stderr
    help_run = subprocess.run(
        [sys.executable, "-m", "tunnelnat_cli", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert help_run.returncode == 0 and "enroll" in help_run.stdout


def test_main_is_importable_from_the_package():
    from tunnelnat_cli import Runtime, main

    out = io.StringIO()
    assert main(["--help"], Runtime(out=out, err=out)) == 0
    assert "usage: tunnelnat" in out.getvalue()


# -- issue 14, finding 7: a stranger's inputs end in one line and exit 2, never a traceback -------
@pytest.mark.parametrize("endpoint", ["not-a-url", "ftp://127.0.0.1:1", "http://", "http://a b"])
def test_an_endpoint_that_is_not_a_url_is_one_line(dep, endpoint):
    err = one_line(dep.run("status", "--endpoint-url", endpoint))
    assert err.startswith(f"tunnelnat: --endpoint-url {endpoint!r} is not an http(s) URL"), err


def test_an_endpoint_in_the_environment_that_is_not_a_url_is_one_line(dep, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not-a-url")
    err = one_line(dep.run("status", fresh=True))
    assert err.startswith("tunnelnat: AWS_ENDPOINT_URL 'not-a-url' is not an http(s) URL"), err


@pytest.mark.parametrize("option", ["--interval", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "-1", "0", "1e999"])
def test_wait_numbers_are_finite_and_positive(dep, option, value):
    # --opt=VALUE: argparse would read a separate "-inf" as an option (also one line, exit 2).
    for command in (["enroll", "i-0123456789abcdef0"], ["reconcile"]):
        err = one_line(dep.run(*command, "--wait", f"{option}={value}"))
        assert f"argument {option}: must be > 0 and finite, got {value!r}" in err, err
    err = one_line(dep.run("reconcile", option, "-inf"))
    assert f"argument {option}: expected one argument" in err


def test_usage_errors_are_one_line(dep):
    err = one_line(dep.run("frobnicate", base=False))
    assert "invalid choice: 'frobnicate'" in err
    err = one_line(dep.run("enroll", base=False))
    assert err.startswith("tunnelnat enroll: error: the following arguments are required: INSTANCE")


def test_only_aws_region_set_is_honoured(dep, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    result = dep.run("status", "--json", fresh=True)
    assert result.code == 0, result.err
    assert result.json()["region"] == "us-east-1"


def test_only_aws_default_region_set_is_honoured(dep, monkeypatch):
    monkeypatch.delenv("AWS_REGION")
    result = dep.run("status", "--json", fresh=True)
    assert result.code == 0, result.err
    assert result.json()["region"] == "us-east-1"


def test_aws_region_wins_over_aws_default_region(dep, monkeypatch):
    """As in the AWS CLI v2: AWS_REGION overrides AWS_DEFAULT_REGION; --region overrides both."""
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    err = one_line(dep.run("status", fresh=True))
    assert f"DynamoDB table {TABLE!r} not found in region eu-west-3" in err
    result = dep.run("status", "--json", "--region", "us-east-1", fresh=True)
    assert result.code == 0 and result.json()["region"] == "us-east-1"


def test_an_unexpected_failure_is_one_line(dep, monkeypatch):
    from tunnelnat_cli import status

    def broken(ctx):
        raise RuntimeError("something nobody planned for\nwith a second line")

    monkeypatch.setattr(status, "collect", broken)
    err = one_line(dep.run("status"))
    assert err == (
        "tunnelnat: unexpected error: RuntimeError: something nobody planned for with a second "
        "line (run with --debug for the traceback)\n"
    )
    result = dep.run("status", "--debug")
    assert result.code == 2 and "Traceback" in result.err and "RuntimeError" in result.err
