"""AWS access for the CLI: one session (standard credential and region resolution), lazily built
clients pointed at ``--endpoint-url`` when given, and the translation of AWS failures into one
line an operator can act on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

# An operator waits on the terminal: fail fast on an unreachable endpoint, still retry throttling.
CLIENT_CONFIG = Config(retries={"mode": "standard"}, connect_timeout=5, read_timeout=30)


class CliError(Exception):
    """A failure the operator can fix; printed as one line on stderr (no traceback)."""

    def __init__(self, message: str, *, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Aws:
    """The clients one command uses; ``overrides`` replaces a service's client (tests, Stubber)."""

    def __init__(
        self,
        *,
        region: str | None,
        endpoint_url: str | None,
        profile: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        session: boto3.session.Session | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        # botocore reads AWS_DEFAULT_REGION only; the AWS CLI v2 and the other SDKs read
        # AWS_REGION first. Both are honoured, in the CLI's order: --region, AWS_REGION,
        # AWS_DEFAULT_REGION, the profile's region.
        region = region or os.environ.get("AWS_REGION") or None
        self._region = region
        # A given session (tests: one per run, so service models load once) keeps its own
        # credentials; otherwise the standard chain, with --profile when given.
        self._session = session or boto3.session.Session(region_name=region, profile_name=profile)
        self._clients: dict[str, Any] = dict(overrides or {})

    @property
    def configured_region(self) -> str | None:
        return self._region or self._session.region_name

    @property
    def region(self) -> str:
        region = self.configured_region
        if not region:
            raise NoRegionError()
        return region

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(
                service,
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=CLIENT_CONFIG,
            )
        return self._clients[service]


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def describe_failure(exc: BaseException, *, table: str, region: str | None) -> str:
    """One line saying what went wrong and what to do, for an AWS failure nobody handled."""
    where = f"region {region}" if region else "the configured region"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            "no AWS credentials found: set AWS_PROFILE (or pass --profile), run `aws configure` "
            "or `aws sso login`, or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, NoRegionError):
        return "no AWS region configured: pass --region or set AWS_REGION"
    if isinstance(exc, BotoConnectionError):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the AWS endpoint")
        return (
            f"cannot reach {endpoint}: check --region ({region or 'unset'}) and --endpoint-url, "
            "and that the network (or the lab's moto server) is up"
        )
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        operation = exc.operation_name
        if code == "ResourceNotFoundException" and operation in (
            "GetItem",
            "Query",
            "Scan",
            "DescribeTable",
        ):
            return (
                f"DynamoDB table {table!r} not found in {where}: pass --table (or set "
                "TUNNELNAT_TABLE_NAME) and check --region/--endpoint-url"
            )
        if code in (
            "UnrecognizedClientException",
            "InvalidClientTokenId",
            "AuthFailure",
            "ExpiredToken",
            "ExpiredTokenException",
            "InvalidSignatureException",
            "SignatureDoesNotMatch",
        ):
            return (
                f"AWS rejected the credentials ({code}): refresh them (`aws sso login`, a new "
                "session token) or pick another --profile"
            )
        if code.startswith("AccessDenied") or code in ("UnauthorizedOperation", "Forbidden"):
            return (
                f"permission denied for {operation} ({code}): the caller's IAM policy must allow "
                f"it; {message}"
            )
        return f"AWS error in {operation}: {code}: {message}"
    if isinstance(exc, BotoCoreError):
        return f"AWS client error: {exc}"
    return f"{type(exc).__name__}: {exc}"


AWS_ERRORS = (BotoCoreError, ClientError)
