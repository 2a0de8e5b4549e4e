"""PskRollout: a new pre-shared key reaches the gateway by itself.

The gateway reads the PSK only when ``ConfigureTunnel`` runs. Its State Manager association runs
it on each new gateway and on a parameter change, but putting a new secret value changes neither,
so without this the gateway would keep the old (at first: the random) key until the association's
next scheduled run. ConfigureTunnel restarts the tunnel's IKE SA when the key changed (an IKE SA
that is up never authenticates again by itself), so the new key is proven by the run.

What triggers: Secrets Manager's own ``Secret Label Updated`` event, which it sends to the default
event bus when a staging label (here ``AWSCURRENT``, the version the gateway reads) moves to a new
version: ``put-secret-value``, ``update-secret`` with a value, the end of a rotation, a hand-moved
label. It needs no CloudTrail trail. The older way, matching ``AWS API Call via CloudTrail`` events
(PutSecretValue, UpdateSecret, ...), needs a trail with logging enabled in the account (EventBridge
user guide, "AWS service events delivered via AWS CloudTrail"), which a new account lacks; it
also fires on a PutSecretValue into ``AWSPENDING`` that changes nothing the gateway reads, and
its ``requestParameters.secretId`` is whatever the caller passed (a name, a full or a partial
ARN), so only ``responseElements.arn`` (spelt ``aRN`` by some operations before February 2024)
names the secret reliably. The native event carries the full ARN in ``resources``. Sources:
https://docs.aws.amazon.com/secretsmanager/latest/userguide/secret-event-notifications.html and
https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-service-event-cloudtrail.html.

What runs: no Lambda. The rule's target is Run Command itself (an EventBridge target with
``RunCommandParameters``): ``ConfigureTunnel`` on the gateway group's instances, with
exactly its association's parameters (read from the association, so the two cannot drift), through
a role that may send only that document, only to this deployment's gateway. The run shows in Run
Command's history, where ``tunnelnat psk set --wait`` follows it. ConfigureTunnel holds a lock,
so this run and an association's never overlap on the gateway.
"""

from __future__ import annotations

from typing import Any

from aws_cdk import ArnFormat, Stack
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.documents import Documents
from stacks.nag import acknowledge, wildcard_arn
from stacks.policies import send_command_to_gateway
from stacks.settings import GROUP_NAME_TAG, StackSettings

DOCUMENT = "ConfigureTunnel"
SOURCE = "aws.secretsmanager"
LABEL_UPDATED = "Secret Label Updated"
CURRENT = "AWSCURRENT"  # the version GetSecretValue returns by default: what the gateway reads
# A failed SendCommand (throttled, the gateway replaced mid-way) is retried for an hour; past
# that the association's own schedule is the backstop.
RETRY_ATTEMPTS = 20
MAX_EVENT_AGE_SECONDS = 3600


def secret_pattern(*, secret_arn: str | None, secret_name: str, account: str) -> dict[str, Any]:
    """The event pattern for "the PSK's AWSCURRENT version changed", for this secret only.

    A secret the stack created is matched by its full ARN (the event's ``resources``); an
    imported one, whose ARN suffix the stack does not know, by its name (``detail.name``), which
    is unique in the account and region the rule sees.
    """
    pattern: dict[str, Any] = {
        "source": [SOURCE],
        "detail-type": [LABEL_UPDATED],
        "account": [account],
        "detail": {"labelUpdated": [CURRENT]},
    }
    if secret_arn is not None:
        pattern["resources"] = [secret_arn]
    else:
        pattern["detail"]["name"] = [secret_name]
    return pattern


class PskRollout(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: StackSettings,
        psk: secretsmanager.ISecret,
        psk_name: str,
        association: ssm.CfnAssociation,
        documents: Documents,
        role: iam.Role | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        deployment = settings.deployment
        # The association's own parameters, not a copy: whatever ConfigureTunnel is given there
        # (checked against the document's allowedPatterns by Documents.check_parameters) is
        # what this run is given.
        self.parameters: dict[str, list[str]] = dict(association.parameters or {})
        if self.parameters.get("PskSecretName") != [psk_name]:
            raise ValueError(
                f"the {DOCUMENT} association reads PskSecretName "
                f"{self.parameters.get('PskSecretName')!r}, not this secret"
            )
        document_arn = stack.format_arn(
            service="ssm",
            resource="document",
            resource_name=documents.name(DOCUMENT),
            arn_format=ArnFormat.SLASH_RESOURCE_NAME,
        )
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")

        if role is not None:
            # Another rollout's role (one per deployment, not per partner): it may send only
            # ConfigureTunnel, only to this deployment's gateways, whichever partner's run it is.
            self.role = role
        else:
            self.role = self._role(stack, deployment, settings, document_arn, instances)
        self._rule(stack, deployment, settings, psk, psk_name, document_arn)
        self.document_name = documents.name(DOCUMENT)

    def _role(
        self,
        stack: Stack,
        deployment: str,
        settings: StackSettings,
        document_arn: str,
        instances: str,
    ) -> iam.Role:
        role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("events.amazonaws.com"),
            description=f"{deployment}: EventBridge runs ConfigureTunnel on the gateway when "
            "the PSK changes",
            inline_policies={
                "RunConfigureTunnelOnTheGateway": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            sid="RunOnlyConfigureTunnel",
                            actions=["ssm:SendCommand"],
                            resources=[document_arn],
                        ),
                        send_command_to_gateway(instances, settings.gateway_group_name),
                    ]
                )
            },
        )
        acknowledge(
            role,
            f"AwsSolutions-IAM5[Resource::{wildcard_arn(self, 'ec2', 'instance/*')}]",
            "The gateway is whichever instance its Auto Scaling group launched: SendCommand on "
            "instance/* requires the instance's aws:autoscaling:groupName to be the gateway "
            "group's (a tag no user can set).",
        )
        return role

    def _rule(
        self,
        stack: Stack,
        deployment: str,
        settings: StackSettings,
        psk: secretsmanager.ISecret,
        psk_name: str,
        document_arn: str,
    ) -> None:
        pattern = secret_pattern(
            secret_arn=psk.secret_full_arn,
            secret_name=psk_name,
            account=stack.account,
        )
        self.rule = events.CfnRule(
            self,
            "Rule",
            description=f"{deployment}: a new PSK (AWSCURRENT moved) re-runs ConfigureTunnel",
            state="ENABLED",
            event_pattern=pattern,
            targets=[
                events.CfnRule.TargetProperty(
                    id=DOCUMENT,
                    arn=document_arn,
                    role_arn=self.role.role_arn,
                    # Run Command's parameters, as SendCommand takes them: name -> [value].
                    input=stack.to_json_string(self.parameters),
                    run_command_parameters=events.CfnRule.RunCommandParametersProperty(
                        run_command_targets=[
                            # The gateway group's members (a tag no user can set), as the
                            # association targets them.
                            events.CfnRule.RunCommandTargetProperty(
                                key=f"tag:{GROUP_NAME_TAG}",
                                values=[settings.gateway_group_name],
                            )
                        ]
                    ),
                    retry_policy=events.CfnRule.RetryPolicyProperty(
                        maximum_retry_attempts=RETRY_ATTEMPTS,
                        maximum_event_age_in_seconds=MAX_EVENT_AGE_SECONDS,
                    ),
                )
            ],
        )
