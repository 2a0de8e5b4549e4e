"""Documents at synthesis: every gateway document bound to the gateway software's package and
within 8 KB, the instance documents within tunnelnat's 48 KB (SSM refuses 64 KB), the first line
the SSM agent's ``sh -c`` needs, the gateway's configuration split between ConfigureGateway and
ConfigureTunnel, and the health agent's document with its own association.

Built in a bare stack (GatewaySoftware, Documents and HealthAgent only): seconds, not a whole
synthesis.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from aws_cdk import App, Stack
from aws_cdk.assertions import Template

from stacks.documents import (
    INSTANCE_DOCUMENTS,
    MAX_DOCUMENT_BYTES,
    MAX_GATEWAY_DOCUMENT_BYTES,
    DocumentError,
    Documents,
    deployed_size,
)
from stacks.gateway_software import GatewaySoftware
from stacks.health_agent import HealthAgent
from stacks.settings import load_settings
from tests.infra.conftest import DOCUMENTS_DIR, example_context

PROBE = {"health_probe_target": "198.51.100.5:443", "health_probe_source": "192.0.2.11"}


GATEWAY_DOCUMENTS = sorted(
    p.stem for p in DOCUMENTS_DIR.glob("*.yaml") if p.stem not in INSTANCE_DOCUMENTS
)


def build(context=None, documents_dir=DOCUMENTS_DIR, bind=True):
    settings = load_settings(example_context(context))
    stack = Stack(App(), "Docs", env={"region": "eu-west-1", "account": "123456789012"})
    software = GatewaySoftware(stack, "GatewaySoftware", deployment="tunnelnat") if bind else None
    documents = Documents(
        stack, "Documents", directory=documents_dir, prefix="tn-", software=software
    )
    agent = HealthAgent(
        stack, "HealthAgent", config=settings.config, settings=settings.stack, documents=documents
    )
    return stack, documents, agent


@pytest.fixture(scope="module")
def built():
    stack, documents, agent = build(PROBE)
    return Template.from_stack(stack).to_json(), stack, documents, agent


def test_every_document_is_within_48_kb_as_deployed(built):
    template, _, documents, _ = built
    assert MAX_DOCUMENT_BYTES == 48 * 1024
    contents = [
        r["Properties"]["Content"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::SSM::Document"
    ]
    assert len(contents) == len(list(DOCUMENTS_DIR.glob("*.yaml")))
    for content in contents:
        assert len(json.dumps(content).encode()) <= MAX_DOCUMENT_BYTES
    for stem in documents.stems:
        assert documents.sizes[stem] <= documents.limit(stem), stem


def test_a_document_between_48_and_64_kb_fails_synthesis(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    path = target / "AddHostRoute.yaml"
    content = yaml.safe_load(path.read_text())
    content["description"] = "x" * (50 * 1024 - deployed_size(content))
    assert MAX_DOCUMENT_BYTES < deployed_size(content) < 64 * 1024
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(DocumentError, match=r"AddHostRoute.yaml: \d+ bytes as deployed, over"):
        build(documents_dir=target)


def test_every_document_but_the_instances_is_a_gateway_document(built):
    _, _, documents, _ = built
    assert documents.gateway_documents == set(GATEWAY_DOCUMENTS)
    assert MAX_GATEWAY_DOCUMENT_BYTES == 8 * 1024
    for stem in INSTANCE_DOCUMENTS:
        assert documents.limit(stem) == MAX_DOCUMENT_BYTES


# Issue 22: a gateway document is a short invocation of its verb.
@pytest.mark.parametrize("stem", GATEWAY_DOCUMENTS)
def test_every_gateway_document_is_within_8_kb_as_deployed(built, stem):
    """Measured with the longest bucket, key and region the asset's tokens can become."""
    _, _, documents, _ = built
    assert documents.sizes[stem] <= MAX_GATEWAY_DOCUMENT_BYTES, documents.sizes[stem]


def test_a_gateway_document_over_8_kb_fails_synthesis(tmp_path):
    target = tmp_path / "docs"
    shutil.copytree(DOCUMENTS_DIR, target)
    path = target / "RestartTunnel.yaml"
    content = yaml.safe_load(path.read_text())
    content["description"] = "x" * (9 * 1024)
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(
        DocumentError,
        match=r"RestartTunnel.yaml: \d+ bytes as deployed, over tunnelnat's 8192-byte limit",
    ):
        build(documents_dir=target)


def test_an_unbound_placeholder_fails_synthesis(tmp_path):
    """Without the package to bind them to (no GatewaySoftware), a gateway document's
    placeholders would reach the gateway as they are: synthesis stops."""
    with pytest.raises(DocumentError, match="placeholder is left unbound"):
        build(bind=False)


def test_gateway_documents_are_bound_to_the_package(built):
    template, stack, documents, _ = built
    software = stack.node.find_child("GatewaySoftware")
    for stem in documents.gateway_documents - {"InstallGatewaySoftware"}:
        content = template["Resources"][stack.get_logical_id(documents.resources[stem])]
        text = json.dumps(content["Properties"]["Content"])
        assert "__TUNNELNAT_PACKAGE_" not in text, stem
        assert f"pkg_sha256={software.sha256}" in text, stem


@pytest.mark.parametrize("stem", GATEWAY_DOCUMENTS)
def test_gateway_documents_start_with_bash(built, stem):
    # The SSM agent runs the script with `sh -c`: dash on Ubuntu, unless line 1 says bash.
    _, _, documents, _ = built
    (step,) = documents.contents[stem]["mainSteps"]
    assert step["inputs"]["runCommand"][0].splitlines()[0] == "#!/bin/bash"


def test_health_agent_has_its_own_association_on_the_gateway_group(built):
    template, stack, documents, agent = built
    association = template["Resources"][stack.get_logical_id(agent.association)]["Properties"]
    assert association["Name"] == {
        "Ref": stack.get_logical_id(documents.resources["InstallHealthAgent"])
    }
    assert association["AssociationName"] == "tunnelnat-InstallHealthAgent"
    # Issue 21, finding 1: the group's members (aws:autoscaling:groupName: no user sets it).
    assert association["Targets"] == [
        {"Key": "tag:aws:autoscaling:groupName", "Values": ["tunnelnat-gateway"]}
    ]
    params = {k: v[0] for k, v in association["Parameters"].items()}
    assert params == {
        "TunnelName": "partner",
        "Region": {"Ref": "AWS::Region"},
        "Deployment": "tunnelnat",
        "HealthInterval": "60",
        "ProbeTarget": "198.51.100.5:443",
        "ProbeSource": "192.0.2.11",
        "PartnerNetworks": "198.51.100.0/28",
        "PublicAddresses": "192.0.2.10,192.0.2.11",
        # Issue 21, finding 3: the namespace only this deployment's gateway role writes.
        "Namespace": "tunnelnat/tunnelnat",
    }


def test_configure_gateway_no_longer_takes_the_health_parameters(built):
    _, _, documents, _ = built
    for name in ("Deployment", "HealthInterval", "ProbeTarget", "ProbeSource"):
        assert not documents.declares("ConfigureGateway", name)
        assert not documents.declares("ConfigureTunnel", name)
        assert documents.declares("InstallHealthAgent", name)


def test_the_tunnel_is_configure_tunnels_and_the_nat_configure_gateways(built):
    """The split that keeps both documents well under the limit: strongSwan and the PSK in
    ConfigureTunnel, the NAT table and forwarding in ConfigureGateway."""
    _, _, documents, _ = built
    tunnel = {"PartnerEndpoint", "PublicAddresses", "LocalId", "RemoteId", "PskSecretName"}
    tunnel |= {"IkeProposals", "EspProposals", "IkeLifetimes", "ChildLifetimes", "Dpd"}
    tunnel |= {"SelectorLayout", "KeyingTries", "StartAction", "CharonLog", "TunnelName"}
    nat = {"TableName", "NatMode", "SharedAddress", "TunnelMss"}
    for name in tunnel:
        assert documents.declares("ConfigureTunnel", name), name
        assert not documents.declares("ConfigureGateway", name), name
    for name in nat:
        assert documents.declares("ConfigureGateway", name), name
        assert not documents.declares("ConfigureTunnel", name), name
    for name in ("PartnerNetworks", "IpsecBackend", "Region"):  # both need them
        assert documents.declares("ConfigureGateway", name)
        assert documents.declares("ConfigureTunnel", name)
    script = {
        stem: documents.contents[stem]["mainSteps"][0]["inputs"]["runCommand"][0]
        for stem in ("ConfigureGateway", "ConfigureTunnel")
    }
    # The code is the package's (issue 22): no module of it embedded in either.
    for text in script.values():
        assert "embed lambdas/" not in text and "embed gateway/tunnelnat_gateway" not in text
    assert 'exec python3 "$pkg" configure-tunnel ' in script["ConfigureTunnel"]
    assert 'exec python3 "$pkg" configure-gateway ' in script["ConfigureGateway"]
    assert "swanctl" not in script["ConfigureGateway"]
    assert "ip_forward" not in script["ConfigureTunnel"]
    assert "nat.py" not in script["ConfigureTunnel"]
