"""Fetch the gateway software (tunnelnat_gateway's zipapp) from the stack's asset bucket.

The bootstrap, not part of the package it fetches: the user data runs it at first boot, every
gateway document embeds it (tools/build_documents.py, compact) for when the package it was
synthesized with is missing, InstallGatewaySoftware runs it on every change. Standard library
and the image's boto3 only, and small: a gateway document carries it within its 8 KB.

    install_package.py --bucket B --key K --sha256 H --region R
    install_package.py --parameter NAME --region R

``--parameter`` reads the archive's bucket, key, SHA-256 and region from the SSM parameter the
stack writes (/tunnelnat/<deployment>/gateway-software, JSON): the user data names only the
parameter, so the launch template stays the same when the code changes (docs/gateway-software.md).

The archive is content-addressed, LIB/gateway/<sha256>.pyz (LIB: /etc/tunnelnat/lib, or
TUNNELNAT_LIB), written beside itself, synced and renamed: a path that exists holds the whole
archive, and a document that runs it never sees it change. A download whose SHA-256 is not the
one asked for is refused and nothing is written (so H is 64 hex digits, never a path). Prints the
archive's path. Making it the one the units run, pruning old ones and restarting the pair agent
are the package's own ``activate`` verb (tunnelnat_gateway/activate.py).
"""

import hashlib
import json
import os
import sys

import boto3


def main(argv: list[str]) -> int:
    # --NAME VALUE pairs (no argparse: this file rides in every gateway document).
    args = dict(zip(argv[::2], argv[1::2], strict=False))
    # Standard retries ride out a throttle or a new instance's network (botocore reads these).
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "10")
    # A missing argument or a parameter that is not the software's JSON: KeyError, ValueError.
    if "--parameter" in args:
        ssm = boto3.client("ssm", region_name=args["--region"])
        value = ssm.get_parameter(Name=args["--parameter"])["Parameter"]["Value"]
        args = {f"--{k}": v for k, v in dict(json.loads(value)).items()}
    s3 = boto3.client("s3", region_name=args["--region"])
    body = s3.get_object(Bucket=args["--bucket"], Key=args["--key"])["Body"].read()
    got = hashlib.sha256(body).hexdigest()
    if got != args["--sha256"]:
        raise SystemExit(f"install_package: the archive is {got}, not {args['--sha256']}")
    path = f"{os.environ.get('TUNNELNAT_LIB', '/etc/tunnelnat/lib')}/gateway/{got}.pyz"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, body)
    os.fchmod(fd, 0o755)  # whatever the umask: root's program, readable by all like /usr/bin
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
