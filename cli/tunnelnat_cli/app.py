"""Argument parsing, dispatch, and the one place AWS failures become one line and an exit code.

Exit codes: 0 done / healthy; 1 the controller reported a failure, a wait timed out, or doctor
has findings; 2 the command could not do its job (bad input, unknown instance, credentials,
region, endpoint, missing table or queue).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn
from urllib.parse import urlsplit

from botocore.exceptions import ClientError
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

from tunnelnat.core.config import TAG_TEXT
from tunnelnat.core.text import printable
from tunnelnat_cli import (
    dlq,
    doctor,
    enrol,
    partners,
    psk,
    reconcile,
    status,
    switchover,
    tunnels,
)
from tunnelnat_cli.aws import (
    AWS_ERRORS,
    EXIT_ERROR,
    Aws,
    CliError,
    describe_failure,
    error_code,
)
from tunnelnat_cli.context import Change, Ctx, Runtime

__all__ = ["Change", "Runtime", "build_parser", "main"]
TUNNEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")  # as ShowTunnels' allowedPattern


def _tag_text(value: str) -> str:
    if not TAG_TEXT.fullmatch(value) or value.lower().startswith("aws:"):
        raise argparse.ArgumentTypeError(
            f"{value[:40]!r}: 1-128 letters, digits, spaces and _.:/=+@- (no aws: prefix)"
        )
    return value


def _positive(value: str) -> float:
    """Seconds: a finite number > 0 (``nan`` compares false with everything, ``inf`` never ends)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {value[:40]!r}")
    return number


def _tunnel_name(value: str) -> str:
    if not TUNNEL_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value[:40]!r}: a letter, then up to 31 letters, digits, _ or -"
        )
    return value


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value[:40]!r}")
    return number


def one_line(text: str) -> str:
    """Every error the CLI prints is one line, whatever the message carried, and nothing a
    terminal would obey (an instance's stderr is often part of it: issue 21, 7)."""
    return " ".join(printable(str(text)).split())


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other error; subcommand
    parsers are made of the same class."""

    # Set when the command line may hold a secret typed in the wrong place (`psk set KEY`):
    # argparse would print the stray words back.
    redact_unrecognized = False

    def error(self, message: str) -> NoReturn:
        if self.redact_unrecognized and message.startswith("unrecognized arguments"):
            message = (
                "unrecognized arguments (not shown: a key is never given as an argument; pipe "
                "it on stdin or pass --file)"
            )
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see: {self.prog} --help)\n")


def endpoint_problem(url: str) -> str | None:
    """Why botocore would refuse ``url`` as an endpoint (it raises ValueError when building the
    client), or None. Its own check, plus: the scheme is http(s) and the port a number."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return "is not an http(s) URL"
    if parts.scheme not in ("http", "https") or not (
        is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url)
    ):
        return "is not an http(s) URL"
    return None


def check_endpoints(endpoint_url: str | None) -> None:
    """--endpoint-url, else the AWS_ENDPOINT_URL* variables botocore would use."""
    if endpoint_url is not None:
        problem = endpoint_problem(endpoint_url)
        if problem:
            raise CliError(
                f"--endpoint-url {endpoint_url[:80]!r} {problem} (e.g. http://127.0.0.1:5000)"
            )
        return
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return
    for name in sorted(os.environ):
        value = os.environ[name]
        if (name == "AWS_ENDPOINT_URL" or name.startswith("AWS_ENDPOINT_URL_")) and value:
            problem = endpoint_problem(value)
            if problem:
                raise CliError(
                    f"{name} {value[:80]!r} {problem}: fix or unset it, or pass --endpoint-url"
                )


def _common(*, top: bool) -> argparse.ArgumentParser:
    """The global options, accepted before and after the subcommand. Only the top-level parser
    sets defaults: a subparser's default would overwrite a value given before the subcommand."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    common = _Parser(add_help=False)
    aws = common.add_argument_group("AWS and deployment")
    aws.add_argument(
        "--region",
        default=default(None),
        help="AWS region (default: AWS_REGION, else AWS_DEFAULT_REGION, else the profile's)",
    )
    aws.add_argument(
        "--profile", default=default(None), help="AWS named profile (default: standard resolution)"
    )
    aws.add_argument(
        "--endpoint-url",
        default=default(None),
        help="AWS endpoint override, e.g. the lab's moto server (default: AWS_ENDPOINT_URL)",
    )
    aws.add_argument(
        "--table",
        default=default(None),
        help="enrolment table (default: the stack's TableName output with --stack, else "
        "$TUNNELNAT_TABLE_NAME, else the deployment's name)",
    )
    aws.add_argument(
        "--stack",
        default=default(None),
        help="CloudFormation stack to read names from (outputs TableName, QueueUrl, "
        "DeadLetterQueueUrl, ControllerFunctionName, PskSecretName)",
    )
    aws.add_argument(
        "--deployment",
        default=default(os.environ.get("TUNNELNAT_DEPLOYMENT") or "tunnelnat"),
        help="deployment name: gateway tag, queue/alarm prefix (default: tunnelnat)",
    )
    aws.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    tags = _Parser(add_help=False)
    tags.add_argument("--tag-key", type=_tag_text, help="enrolment tag key (default: tunnelnat)")
    tags.add_argument("--tag-value", type=_tag_text, help="enrolment tag value (default: enabled)")

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    def wait_flags(p: argparse.ArgumentParser, timeout: float) -> None:
        p.add_argument("--wait", action="store_true", help="follow progress until done")
        p.add_argument(
            "--timeout", type=_positive, default=timeout, help="seconds (default: %(default)s)"
        )
        p.add_argument(
            "--interval", type=_positive, default=2.0, help="poll seconds (default: %(default)s)"
        )

    parser = _Parser(
        prog="tunnelnat",
        description="Operate a tunnelnat deployment: enrol instances, see status, diagnose.",
        parents=[_common(top=True)],
        epilog="exit codes: 0 ok, 1 failed / timed out / findings, 2 error",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", parents=[common, tags], help="instances, generations, tunnels")
    json_flag(p)
    p.set_defaults(func=status.run)

    for name, func, text in (
        ("enroll", enrol.run_enroll, "tag an instance for enrolment"),
        ("unenroll", enrol.run_unenroll, "remove an instance's enrolment tag"),
    ):
        p = sub.add_parser(name, parents=[common, tags], help=text)
        p.add_argument("instance", metavar="INSTANCE", help="instance ID (i-...)")
        wait_flags(p, 300.0)
        json_flag(p)
        p.set_defaults(func=func)

    p = sub.add_parser("reconcile", parents=[common], help="ask the controller to reconcile")
    p.add_argument("instances", metavar="INSTANCE", nargs="*", help="instance IDs (none: all)")
    p.add_argument("--queue-url", help="controller queue (default: <deployment>-events)")
    wait_flags(p, 300.0)
    json_flag(p)
    p.set_defaults(func=reconcile.run)

    p = sub.add_parser("dlq", parents=[common], help="list or redrive the dead-letter queue")
    p.add_argument("--redrive", action="store_true", help="reconcile their instances, delete them")
    p.add_argument("--dlq-url", help="dead-letter queue (default: <deployment>-events-dlq)")
    p.add_argument("--queue-url", help="controller queue (default: <deployment>-events)")
    p.add_argument(
        "--max", type=_count, default=1000, help="most messages read (default: %(default)s)"
    )
    json_flag(p)
    p.set_defaults(func=dlq.run)

    p = sub.add_parser(
        "tunnels",
        parents=[common],
        help="the gateway's IPsec SAs: selectors, proposals, age, last rekey, traffic",
        description="List the gateway's IKE and CHILD SAs as charon reports them now, through "
        "the read-only <deployment>-ShowTunnels document (SSM Run Command).",
    )
    p.add_argument("--tunnel", type=_tunnel_name, help="only this tunnel (default: every one)")
    p.add_argument(
        "--timeout", type=_positive, default=60.0, help="seconds to wait (default: %(default)s)"
    )
    json_flag(p)
    p.set_defaults(func=tunnels.run)

    p = sub.add_parser(
        "switchover",
        parents=[common],
        help="hand G over to the ready standby (a planned switchover of the gateway pair)",
        description="Ask the active gateway's pair agent to hand G's ENI over to the ready "
        "standby, through the <deployment>-Switchover document (SSM Run Command): no detection "
        "wait, no forced detach. Refused when no standby is ready (its agent's report: role "
        "standby, the tunnel loaded, the NAT table current, fresh). --wait follows the command "
        "and prints the new active.",
    )
    wait_flags(p, 120.0)
    json_flag(p)
    p.set_defaults(func=switchover.run)

    p = sub.add_parser("doctor", parents=[common, tags], help="check the deployment")
    p.add_argument("--gateway-ip", help="G, the fixed ENI address (default: from the config)")
    p.add_argument(
        "--function-name",
        help="controller Lambda to read the config from (default: <deployment>-controller)",
    )
    p.add_argument("--dlq-url", help="dead-letter queue (default: <deployment>-events-dlq)")
    p.add_argument("--strict", action="store_true", help="checks that could not run fail too")
    json_flag(p)
    p.set_defaults(func=doctor.run)

    p = sub.add_parser("psk", help="the IPsec pre-shared key")
    psk_sub = p.add_subparsers(dest="psk_command", metavar="ACTION", required=True)
    p = psk_sub.add_parser(
        "set",
        parents=[common],
        help="store a new pre-shared key (stdin or --file, never an argument)",
        description="Store the pre-shared key agreed with the partner in the deployment's "
        "secret. The key is read from stdin (prompted for twice, not shown, on a terminal) or "
        "from --file, never from the command line. The stack then re-runs ConfigureTunnel on "
        "the gateway by itself; --wait follows that to the tunnel.",
    )
    p.add_argument("--file", metavar="PATH", help="read the key from PATH ('-': stdin)")
    p.add_argument(
        "--secret",
        help="secret name or ARN (default: the stack's PskSecretName output with --stack, else "
        "the one <deployment>-ConfigureTunnel reads)",
    )
    p.add_argument(
        "--partner",
        metavar="NAME",
        help="several partners: this partner's key (the secret its ConfigureTunnel-NAME "
        "association reads; --wait follows its tunnel only)",
    )
    wait_flags(p, 900.0)
    json_flag(p)
    p.set_defaults(func=psk.run_set, interval=5.0)  # several AWS calls per poll

    p = sub.add_parser("partners", help="the partners file (several partners: issue 23)")
    partners_sub = p.add_subparsers(dest="partners_command", metavar="ACTION", required=True)
    p = partners_sub.add_parser(
        "check",
        help="validate a partners file and show the plan (no AWS needed)",
        description="Validate a partners file (docs/partners.md): every problem, one a line "
        "(exit 1), or the resolved plan: per partner its tunnel, endpoint, IKE version, networks "
        "and what instances use for them (the alias when they overlap), its S and its tag key "
        "(exit 0). Reads no AWS account: give our VPC's CIDR(s) and the gateway's subnet to check "
        "overlaps with them.",
    )
    p.add_argument("file", metavar="FILE", help="the partners file (YAML)")
    p.add_argument(
        "--vpc-cidr",
        type=partners.network,
        action="append",
        help="our VPC's IPv4 CIDR (repeat for secondary CIDRs)",
    )
    p.add_argument("--gateway-subnet", type=partners.network, help="the gateway's subnet CIDR")
    p.add_argument(
        "--enrolment-tag-key",
        type=_tag_text,
        help="the deployment's enrolment tag key (default: the deployment's default)",
    )
    json_flag(p)
    # Offline: dispatched before any AWS client is built (no credentials, no region).
    p.set_defaults(func=None, offline=partners.run)
    return parser


# Stack output -> option it fills when the option was not given.
STACK_OUTPUTS = {
    "TableName": "table",
    "QueueUrl": "queue_url",
    "DeadLetterQueueUrl": "dlq_url",
    "ControllerFunctionName": "function_name",
    "PskSecretName": "secret",
}


def stack_outputs(aws: Aws, stack: str) -> dict[str, str]:
    try:
        reply = aws.client("cloudformation").describe_stacks(StackName=stack)
    except ClientError as exc:
        if error_code(exc) == "ValidationError":
            raise CliError(
                f"CloudFormation stack {stack!r} not found in region {aws.region}: check --stack "
                "and --region"
            ) from None
        raise
    outputs = reply["Stacks"][0].get("Outputs", [])
    return {o["OutputKey"]: o["OutputValue"] for o in outputs}


def apply_stack_outputs(args: argparse.Namespace, outputs: dict[str, str]) -> None:
    for key, option in STACK_OUTPUTS.items():
        if key in outputs and getattr(args, option, "absent") is None:
            setattr(args, option, outputs[key])


def default_table(args: argparse.Namespace) -> str:
    """--table, else the stack's output (applied before), else $TUNNELNAT_TABLE_NAME, else the
    deployment's name (the stack names the table after the deployment)."""
    return args.table or os.environ.get("TUNNELNAT_TABLE_NAME") or args.deployment


def main(argv: Sequence[str] | None = None, runtime: Runtime | None = None) -> int:
    """Run one ``tunnelnat`` command; returns its exit code. Nothing escapes as a traceback:
    every failure is one line on stderr and exit 2 (``--debug`` adds the traceback)."""
    runtime = runtime or Runtime()
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    parser.redact_unrecognized = "psk" in words
    try:
        with contextlib.redirect_stdout(runtime.out), contextlib.redirect_stderr(runtime.err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    region: str | None = args.region
    try:
        return _run(args, runtime)
    except CliError as exc:
        runtime.err.write(f"tunnelnat: {one_line(exc.message)}\n")
        return exc.code
    except AWS_ERRORS as exc:
        if args.debug:
            traceback.print_exc(file=runtime.err)
        region = getattr(args, "resolved_region", region)
        table = default_table(args)
        failure = describe_failure(exc, table=table, region=region)
        runtime.err.write(f"tunnelnat: {one_line(failure)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        runtime.err.write("tunnelnat: interrupted\n")
        return 130
    except Exception as exc:  # the last resort: a bug or a case nobody foresaw, still one line
        if args.debug:
            traceback.print_exc(file=runtime.err)
        runtime.err.write(
            f"tunnelnat: unexpected error: {type(exc).__name__}: {one_line(str(exc))} "
            "(run with --debug for the traceback)\n"
        )
        return EXIT_ERROR


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    if getattr(args, "offline", None) is not None:
        return args.offline(args, runtime)
    if args.command in ("status", "enroll", "unenroll"):
        args.tag_key = args.tag_key or "tunnelnat"
        args.tag_value = args.tag_value or "enabled"
    if getattr(args, "gateway_ip", None):
        from ipaddress import IPv4Address

        try:
            IPv4Address(args.gateway_ip)
        except ValueError:
            raise CliError(f"--gateway-ip {args.gateway_ip!r} is not an IPv4 address") from None
    check_endpoints(args.endpoint_url)
    aws = Aws(
        region=args.region,
        endpoint_url=args.endpoint_url,
        profile=args.profile,
        overrides=runtime.clients,
        session=runtime.session,
    )
    args.resolved_region = aws.configured_region
    if args.stack:
        apply_stack_outputs(args, stack_outputs(aws, args.stack))
    args.table = default_table(args)
    func: Callable[[Ctx], int] = args.func
    return func(Ctx(args, aws, runtime))


if __name__ == "__main__":
    sys.exit(main())
