"""Mark this gateway Unhealthy in its Auto Scaling group: the user data's last word when the
gateway software could not be installed at first boot.

Not part of the package (it runs exactly when the package is missing). Without it a gateway whose
first fetch failed would sit with no boot, no agent and no tunnel, and only a pair's missing
ready signal would tell CloudFormation; a single gateway would stay broken. Marked Unhealthy, Auto
Scaling replaces it (SetInstanceHealth; the gateway role may call it on its own group only).
Standard library and the image's boto3.

    mark_unhealthy.py REGION REASON
"""

from __future__ import annotations

import os
import sys
import urllib.request

IMDS = os.environ.get("TUNNELNAT_IMDS_URL", "http://169.254.169.254")


def imds(path: str) -> str:
    """One IMDSv2 read (the launch template requires tokens)."""
    token_request = urllib.request.Request(  # noqa: S310 - link-local IMDS (or the lab's)
        f"{IMDS}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with urllib.request.urlopen(token_request, timeout=2) as reply:  # noqa: S310
        token = reply.read().decode()
    request = urllib.request.Request(  # noqa: S310
        f"{IMDS}{path}", headers={"X-aws-ec2-metadata-token": token}
    )
    with urllib.request.urlopen(request, timeout=2) as reply:  # noqa: S310
        return reply.read().decode().strip()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: mark_unhealthy.py REGION REASON", file=sys.stderr)
        return 2
    region, reason = argv
    import boto3
    from botocore.config import Config

    instance_id = imds("/latest/meta-data/instance-id")
    config = Config(retries={"mode": "standard", "max_attempts": 10})
    boto3.client("autoscaling", region_name=region, config=config).set_instance_health(
        InstanceId=instance_id, HealthStatus="Unhealthy", ShouldRespectGracePeriod=False
    )
    print(f"tunnelnat: {reason}: marked {instance_id} Unhealthy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
