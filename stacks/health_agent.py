"""HealthAgent: ``InstallHealthAgent`` on the gateway, by a State Manager association of its own.

The agent (the package's ``health`` verb, gateway/tunnelnat_gateway/health.py, docs/health.md)
publishes ``TunnelUp`` and ``TunnelEstablished`` from a systemd timer. It lives in its own
document rather than in ConfigureGateway's so that each stays well under SSM's document size
limit (issue 11), and so that changing how the health is measured never re-runs the tunnel's
configuration. The association targets the gateway group like ConfigureGateway's
(``aws:autoscaling:groupName``, a tag no user can set: a lookalike instance tagged like a
gateway never gets it): it runs on the first gateway, on every replacement, and again whenever
its parameters change.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Annotations, Aws
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.documents import Documents
from stacks.gateway import gateway_targets
from stacks.settings import StackSettings
from tunnelnat.core.config import TunnelnatConfig
from tunnelnat.core.lanes import Lane

DOCUMENT = "InstallHealthAgent"


def health_agent_parameters(
    config: TunnelnatConfig, settings: StackSettings, tunnels: Sequence[str] = ()
) -> dict[str, str]:
    """What the association passes: this deployment's series, the interval, the probe (if any)
    with the networks and addresses the document checks it against. ``tunnels``: with a
    partners file, every partner's tunnel (comma-separated: one agent watches them all)."""
    return {
        "TunnelName": ",".join(tunnels) if tunnels else settings.tunnel_name,
        "Region": Aws.REGION,
        "Deployment": settings.deployment,
        "HealthInterval": str(settings.health_interval_seconds),
        "ProbeTarget": settings.health_probe_target or "",
        "ProbeSource": str(settings.health_probe_source or ""),
        "PartnerNetworks": ",".join(str(n) for n in config.partner_networks),
        "PublicAddresses": ",".join(str(a) for a in config.public_addresses),
    }


class HealthAgent(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: TunnelnatConfig,
        settings: StackSettings,
        documents: Documents,
        lanes: Sequence[Lane] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        deployment = settings.deployment
        tunnels = [lane.name for lane in lanes]
        self.parameters = health_agent_parameters(config, settings, tunnels)
        if len(tunnels) > 1 and not documents.accepts(DOCUMENT, "TunnelName", ",".join(tunnels)):
            # Until InstallHealthAgent takes a list, the agent watches the first partner only;
            # the others' TunnelUp alarms then see missing data (down): say so at synthesis.
            self.parameters["TunnelName"] = tunnels[0]
            Annotations.of(self).add_warning_v2(
                "tunnelnat:healthAgentOneTunnel",
                f"{DOCUMENT} takes one TunnelName: the health agent watches {tunnels[0]} only, "
                f"not {', '.join(tunnels[1:])} (their TunnelUp alarms will read down)",
            )
        if documents.declares(DOCUMENT, "Namespace"):
            # The gateways' namespace of this deployment: the only one the gateway role may
            # publish to (issue 21), so TunnelUp cannot be forged from outside the group.
            self.parameters["Namespace"] = settings.gateway_metric_namespace
        self.association = ssm.CfnAssociation(
            self,
            DOCUMENT,
            name=documents.require(DOCUMENT).ref,
            association_name=f"{deployment}-{DOCUMENT}",
            document_version="$DEFAULT",
            targets=gateway_targets(settings.gateway_group_name),
            parameters=documents.check_parameters(DOCUMENT, self.parameters),
            # A gateway without its agent is a tunnel nobody watches (the alarm reads missing
            # data as down, and the healer waits: docs/health.md).
            compliance_severity="HIGH",
            max_concurrency="1",
            max_errors="1",
        )
