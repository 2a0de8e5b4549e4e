"""Every shipped document parses, constrains every parameter, and refuses hostile values before
anything runs (the runner validates exactly as SendCommand does: reject, never sanitise)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lab.ssm_runner import InvalidParameters, load_document, render_scripts, run_document
from tools.build_documents import expand
from tunnelnat.adapters.commands import DOCUMENTS

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "ssm_documents").glob("*.yaml"))
# Hostile for every parameter, whatever it holds.
HOSTILE = [
    "1.2.3.4; rm -rf /",
    "$(id)",
    "`id`",
    "192.0.2.0/24\nreboot",
    "192.0.2.0/24\n",
    "' OR 1=1",
    "a" * 1000,
    "",
    "192.0.2.0/24 && curl x",
]
# Out-of-range values, for the parameters that hold addresses.
ADDRESS_PARAMETERS = {
    "Destinations",
    "Gateway",
    "PartnerEndpoint",
    "PartnerNetworks",
    "PublicAddresses",
}  # LocalId and RemoteId are IKE identities (FQDNs too): core/swanctl.py refuses a bad quad
BAD_ADDRESSES = ["256.1.1.1", "10.0.0.999/24", "1.2.3.4/33", "1.2.3", "01.2.3.4.5"]
# A gateway document runs bound to a package (the stack binds it at synthesis): any one will do
# for what is refused before anything runs.
BINDING = {"sha256": "0" * 64, "bucket": "assets", "key": "package.pyz", "region": "us-east-1"}


def valid_parameters(name: str) -> dict[str, str]:
    """Good values for every required parameter of each document."""
    known = {
        "Destinations": "192.0.2.0/24",
        "Gateway": "10.10.1.5",
        "TableName": "tunnelnat-table",
        "Region": "us-east-1",
        "TunnelName": "partner",
        "PartnerEndpoint": "198.51.100.40",
        "PartnerNetworks": "192.0.2.0/24",
        "PublicAddresses": "203.0.113.10,203.0.113.11",
        "LocalId": "198.51.100.10",
        "PskSecretName": "tunnelnat/psk",
        "NatMode": "dedicated",
        "SharedAddress": "none",
        "IpsecBackend": "kernel",
        "Mss": "1360",
        "Deployment": "tunnelnat",
        # InstallGatewaySoftware's: the package's hash and where the stack's asset lies.
        "Sha256": "0" * 64,
        "Bucket": "cdk-hnb659fds-assets-123456789012-us-east-1",
        "Key": "5ef4be1f22f3d783be8876bdd04d28bd94d3b283b9a987ccc91951cda1cd1020.pyz",
    }
    document = load_document(ROOT / "ssm_documents" / f"{name}.yaml")
    params = document.get("parameters") or {}
    missing = [p for p, spec in params.items() if "default" not in spec and p not in known]
    assert not missing, f"add good values for {missing} to this test"
    return {p: known[p] for p in params if p in known and "default" not in params[p]}


def test_the_documents_the_controller_uses_all_ship():
    shipped = {p.stem for p in DOCS}
    assert set(DOCUMENTS) <= shipped, f"missing: {set(DOCUMENTS) - shipped}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.stem)
def test_document_parses_and_every_parameter_is_constrained(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["schemaVersion"] == "2.2"
    assert raw.get("description")
    for step in raw["mainSteps"]:
        assert step["action"] == "aws:runShellScript"
    for name, spec in (raw.get("parameters") or {}).items():
        pattern = spec.get("allowedPattern")
        assert pattern, f"{name} has no allowedPattern"
        assert pattern.startswith("^") and pattern.endswith("$"), f"{name}: anchor the pattern"
        assert spec.get("description"), f"{name} has no description"
        for hostile in ("a;b", "$(id)", "`id`", "a\nb", "a b", "a|b", "a&b", "a>b"):
            assert not re.fullmatch(pattern, hostile), f"{name} accepts {hostile!r}"
    load_document(path)  # the runner's own structural checks


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.stem)
def test_embedded_code_is_current(path):
    text = path.read_text()
    assert expand(text) == text, "stale embedded code: run 'make documents'"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.stem)
def test_valid_parameters_render(path):
    document = load_document(path)
    scripts = render_scripts(document, valid_parameters(path.stem))
    assert scripts and all("{{" not in s for s in scripts)


def _targets(path: Path, hostile: str) -> list[str]:
    """The parameters a hostile value goes into: shell metacharacters into every one (an empty
    value only into the required ones: an optional one may mean "none"), a bad address into those
    that hold addresses."""
    params = load_document(path).get("parameters") or {}
    required = valid_parameters(path.stem)
    if hostile in BAD_ADDRESSES:
        return [n for n in params if n in ADDRESS_PARAMETERS]
    return [n for n in params if hostile or n in required]


def _hostile_cases() -> list:
    return [
        pytest.param(path, hostile, id=f"{path.stem}-{hostile[:30]!r}")
        for path in DOCS
        for hostile in HOSTILE + BAD_ADDRESSES
        if _targets(path, hostile)
    ]


@pytest.mark.parametrize(("path", "hostile"), _hostile_cases())
def test_hostile_values_are_rejected_before_anything_runs(path, hostile, tmp_path):
    good = valid_parameters(path.stem)
    targets = _targets(path, hostile)
    marker = tmp_path / "ran"
    for name in targets:
        params = {**good, name: hostile}
        with pytest.raises(InvalidParameters, match=name):
            # If validation failed open, PATH points at a directory where 'ip' etc. would not
            # exist, and the marker shows the script started.
            run_document(
                path,
                params,
                env={"PATH": str(tmp_path), "TUNNELNAT_MARKER": str(marker)},
                timeout=5,
                binding=BINDING,
            )
    assert not marker.exists()


def test_undeclared_and_missing_parameters_are_rejected():
    path = ROOT / "ssm_documents" / "AddHostRoute.yaml"
    with pytest.raises(InvalidParameters, match="not declared"):
        run_document(path, {**valid_parameters("AddHostRoute"), "Extra": "x"})
    with pytest.raises(InvalidParameters, match="Gateway"):
        run_document(path, {"Destinations": "192.0.2.0/24"})


# -- the gateway documents' shape (issue 22) -----------------------------------------------------

INSTANCE_DOCUMENTS = {"AddHostRoute", "RemoveHostRoute"}
INSTALL_SOFTWARE = ROOT / "ssm_documents" / "InstallGatewaySoftware.yaml"
VERB_DOCS = [p for p in DOCS if p.stem not in INSTANCE_DOCUMENTS | {INSTALL_SOFTWARE.stem}]


@pytest.mark.parametrize("path", VERB_DOCS, ids=lambda p: p.stem)
def test_a_gateway_document_checks_its_package_then_runs_one_verb(path):
    """The plan's shape: the package check, the package installed if missing (the embedded
    installer, with the synthesized hash), then one verb of the package; no gateway code."""
    from tunnelnat_gateway.__main__ import VERBS

    text = path.read_text()
    assert "# >>> embed gateway/package_check.sh" in text
    assert "# >>> embed gateway/install_package.py" in text
    embeds = re.findall(r"# >>> embed (\S+)", text)
    assert set(embeds) == {"gateway/package_check.sh", "gateway/install_package.py"}, embeds
    (script,) = render_scripts(load_document(path), valid_parameters(path.stem))
    assert script.startswith("#!/bin/bash\n")
    assert f'fail() {{ echo "{path.stem}: $*" >&2; exit 1; }}' in script
    verbs = re.findall(r'exec python3 "\$pkg" ([a-z-]+)', script)
    assert len(verbs) == 1 and verbs[0] in VERBS, verbs
    checked = script.index("pkg_installed() {")
    installed = script.index("if ! pkg_installed; then")
    assert checked < installed < script.index('exec python3 "$pkg"')
    assert '--sha256 "$pkg_sha256"' in script[installed:]


def test_install_gateway_software_parameters_are_tight():
    params = load_document(INSTALL_SOFTWARE)["parameters"]
    assert set(params) == {"Sha256", "Bucket", "Key", "Region"}
    assert not any("default" in spec for spec in params.values())
    cases = {
        "Sha256": (["0" * 64, "a1" * 32], ["0" * 63, "0" * 65, "A" * 64, "g" * 64]),
        "Bucket": (
            ["cdk-hnb659fds-assets-123456789012-eu-west-1", "abc"],
            ["ab", "-abc", "abc-", "ABC", "a" * 64, "a/b", "a_b"],
        ),
        "Key": (
            ["0123abcd.pyz", "assets/x.pyz", "a"],
            ["", "/x.pyz", "../x", "a//b", "a/../b", ".x", "a b", "a" * 129],
        ),
        "Region": (["eu-west-1", "us-gov-west-1", "ap-southeast-5"], ["eu-west", "EU-WEST-1", ""]),
    }
    for name, (good, bad) in cases.items():
        pattern = params[name]["allowedPattern"]
        for value in good:
            assert re.fullmatch(pattern, value), (name, value)
        for value in bad:
            assert not re.fullmatch(pattern, value), (name, value)


@pytest.fixture
def package_in_s3(tmp_path, monkeypatch):
    """The package built from this repository, in moto's S3 (a server: the document's python3
    is another process), and the environment a document runs with."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    from tools.gateway_package import build

    package = build(tmp_path / "build")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "TUNNELNAT_LIB": str(tmp_path / "lib"),
    }
    try:
        import boto3

        s3 = boto3.client(
            "s3",
            region_name="eu-west-1",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        # moto's backends outlive a server in this process: a bucket of this test's own.
        bucket = f"cdk-assets-{tmp_path.name.lower().replace('_', '-')[-40:]}"
        s3.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        key = f"{package.sha256}.pyz"
        s3.put_object(Bucket=bucket, Key=key, Body=package.path.read_bytes())
        params = {"Sha256": package.sha256, "Bucket": bucket, "Key": key, "Region": "eu-west-1"}
        yield package, params, env
    finally:
        server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_install_gateway_software_installs_makes_current_and_reports(package_in_s3, tmp_path):
    import json

    package, params, env = package_in_s3
    lib = tmp_path / "lib"
    first = run_document(INSTALL_SOFTWARE, params, env=env, timeout=120)
    assert first.ok, first.stderr
    (line,) = first.stdout.strip().splitlines()
    report = json.loads(line)
    assert report == {
        "installed": str(lib / "gateway" / f"{package.sha256}.pyz"),
        "version": package.version,
        "sha256": package.sha256,
        "previous": None,
        "changed": True,
        # This machine's PID 1 is not systemd (nor the lab's): the agent is not restarted here.
        "pair_agent": "no systemd",
    }
    assert (lib / "tunnelnat-gateway.pyz").read_bytes() == package.path.read_bytes()
    again = json.loads(run_document(INSTALL_SOFTWARE, params, env=env, timeout=120).stdout)
    assert (again["previous"], again["changed"], again["pair_agent"]) == (
        package.sha256,
        False,
        "unchanged",
    )


def test_install_gateway_software_refuses_an_archive_with_another_hash(package_in_s3, tmp_path):
    package, params, env = package_in_s3
    wrong = {**params, "Sha256": "0" * 64}
    result = run_document(INSTALL_SOFTWARE, wrong, env=env, timeout=120)
    assert not result.ok and result.exit_code != 0
    assert (
        f"InstallGatewaySoftware: cannot install the gateway software {'0' * 64}" in result.stderr
    )
    assert f"is {package.sha256}, not {'0' * 64}" in result.stderr
    assert not (tmp_path / "lib" / "tunnelnat-gateway.pyz").exists()


def test_patterns_accept_lists_and_refuse_bad_octets():
    document = load_document(ROOT / "ssm_documents" / "AddHostRoute.yaml")
    pattern = document["parameters"]["Destinations"]["allowedPattern"]
    assert re.fullmatch(pattern, "192.0.2.0/24,198.51.100.0/25,203.0.113.7/32")
    for bad in ("192.0.2.0", "192.0.2.0/24,", ",192.0.2.0/24", "300.0.2.0/24", "192.0.2.0/-1"):
        assert not re.fullmatch(pattern, bad), bad


# -- InstallHealthAgent's parameters (the health agent's own document) ------------------------

CONFIGURE = ROOT / "ssm_documents" / "ConfigureGateway.yaml"
CONFIGURE_TUNNEL = ROOT / "ssm_documents" / "ConfigureTunnel.yaml"
INSTALL_HEALTH = ROOT / "ssm_documents" / "InstallHealthAgent.yaml"
HEALTH_PATTERNS = {
    "HealthInterval": (
        ["10", "30", "59", "60", "300", "1000", "3599", "3600"],
        ["9", "0", "010", "3601", "9999", "60s", "-60", ""],
    ),
    "ProbeTarget": (
        ["", "198.51.100.5:443", "192.0.2.1:1", "192.0.2.1:65535"],
        ["198.51.100.5", ":443", "192.0.2.1:0", "192.0.2.1:65536", "a.example:443", "1.2.3:4"],
    ),
    "ProbeSource": (["", "192.0.2.50"], ["192.0.2.50:1", "192.0.2", "x"]),
    "Deployment": (["tunnelnat", "acme-2"], ["", "a" * 65, "a b"]),
    # Several partners (issue 23): every tunnel, comma-separated (install-health checks again).
    "TunnelName": (
        ["partner", "bank-a,legacy_b,overlap-c", ",".join(f"t{i}" for i in range(100))],
        ["", "a,", ",a", "a,,b", "a b", "1a", "a;b", ",".join(f"t{i}" for i in range(101))],
    ),
}


@pytest.mark.parametrize("name", HEALTH_PATTERNS)
def test_health_parameters_have_defaults_and_tight_patterns(name):
    spec = load_document(INSTALL_HEALTH)["parameters"][name]
    assert "default" in spec  # existing callers keep working
    good, bad = HEALTH_PATTERNS[name]
    for value in good:
        assert re.fullmatch(spec["allowedPattern"], value), value
    for value in bad:
        assert not re.fullmatch(spec["allowedPattern"], value), value


def test_configure_tunnel_local_address_is_an_ipv4_address_or_empty():
    spec = load_document(CONFIGURE_TUNNEL)["parameters"]["LocalAddress"]
    assert spec["default"] == ""  # a single gateway, and every existing caller: as before
    for good in ("", "10.10.0.10", "192.0.2.255", "0.0.0.0"):
        assert re.fullmatch(spec["allowedPattern"], good), good
    for bad in ("10.10.0.256", "10.10.0", "10.10.0.10/32", " 10.10.0.10", "10.10.0.10;x", "::1"):
        assert not re.fullmatch(spec["allowedPattern"], bad), bad
    script = _script(CONFIGURE_TUNNEL)
    assert '--local-address ""' in script  # the default, rendered


def test_install_health_agent_runs_its_verb_with_every_parameter():
    """The agent, its timer and the probe's checks are the package's (install-health verb,
    tests/unit/test_health_install.py); the document checks the archive it was synthesized
    with, installs it if missing, then execs the verb with each parameter as one argument."""
    document = load_document(INSTALL_HEALTH)
    params = valid_parameters("InstallHealthAgent") | {
        "HealthInterval": "10",
        "ProbeTarget": "192.0.2.7:443",
        "ProbeSource": "203.0.113.10",
        "Deployment": "acme",
    }
    (script,) = render_scripts(document, params)
    assert script.startswith("#!/bin/bash\n")
    assert 'fail() { echo "InstallHealthAgent: $*" >&2; exit 1; }' in script
    waited = script.index("timeout 600 cloud-init status --wait")
    assert waited < script.index("if ! pkg_installed; then") < script.index("exec python3")
    call = script[script.index('exec python3 "$pkg" install-health ') :]
    for flag, value in [
        ("--tunnel", "partner"),
        ("--region", "us-east-1"),
        ("--deployment", "acme"),
        ("--namespace", ""),
        ("--interval", "10"),
        ("--probe", "192.0.2.7:443"),
        ("--probe-source", "203.0.113.10"),
        ("--partner-networks", ""),
        ("--public-addresses", ""),
    ]:
        assert f'{flag} "{value}"' in call, flag
    # Nothing of the old script: no embedded agent, no unit written by the shell.
    assert "tunnelnat_health" not in script and "OnUnitActiveSec" not in script


@pytest.mark.parametrize("path", [CONFIGURE], ids=lambda p: p.stem)  # ConfigureTunnel: below
def test_configure_documents_no_longer_carry_the_agent(path):
    document = load_document(path)
    assert not {"Deployment", "HealthInterval", "ProbeTarget", "ProbeSource"} & set(
        document["parameters"]
    )
    (script,) = render_scripts(document, valid_parameters(path.stem))
    assert "tunnelnat_health" not in script
    assert script.startswith("#!/bin/bash\n")
    # It waits (bounded) for cloud-init's first-boot packages; its verb takes its own lock: an
    # association's run and another (a parameter change, a hand-made one) never overlap
    # (tests/unit/test_configure_gateway.py: held, refused after the wait).
    from tunnelnat_gateway import configure_gateway

    assert "timeout 600 cloud-init status --wait" in script
    assert script.index("cloud-init status --wait") < script.index('"$pkg" configure-gateway')
    assert str(configure_gateway.LOCK_FILE) == "/run/lock/tunnelnat-configure-gateway.lock"
    assert configure_gateway.LOCK_WAIT == 240


def _script(path: Path) -> str:
    (script,) = render_scripts(load_document(path), valid_parameters(path.stem))
    return script


def test_configure_gateway_turns_forwarding_on_only_after_the_guard():
    """On a new gateway ip_forward is off until ConfigureGateway: the table with its guard is
    applied first, so forwarding never runs ahead of it, whichever document runs first. The
    order is the verb's (tests/unit/test_configure_gateway.py, against the kernel): the document
    does nothing of its own after it, nor before it but install the package."""
    script = _script(CONFIGURE)
    assert script.rstrip().splitlines()[-1].endswith('--region "us-east-1"')
    call = script[script.index('exec python3 "$pkg" configure-gateway') :]
    for flag, value in [
        ("--partner-networks", "192.0.2.0/24"),
        ("--nat-mode", "dedicated"),
        ("--shared-address", "none"),
        ("--mss", "1360"),
        ("--backend", "kernel"),
        ("--table", "tunnelnat-table"),
        ("--region", "us-east-1"),
    ]:
        assert f'{flag} "{value}"' in call, flag
    assert not re.search(r"\b(nft|flock|sysctl)\s", script) and "ip_forward" not in script
    assert "swanctl" not in script and "PskSecretName" not in script


@pytest.mark.parametrize(
    ("parameters", "argv"),
    [
        ({}, []),
        ({"Full": "true"}, ["--full"]),
        ({"Verify": "true"}, ["--verify"]),
        ({"Full": "true", "Verify": "true"}, ["--full", "--verify"]),
    ],
)
def test_sync_nat_table_runs_the_installed_package(tmp_path, parameters, argv):
    """SyncNatTable, bound and run as the agent runs it, execs ``python3 <package> sync`` with
    its parameters (the package found installed by its SHA-256: nothing downloaded). python3 is
    a stand-in that records its arguments; the sync itself: tests/unit/test_sync_paths.py."""
    import hashlib

    archive = b"a stand-in for the gateway package"
    sha256 = hashlib.sha256(archive).hexdigest()
    lib = tmp_path / "lib"
    (lib / "gateway").mkdir(parents=True)
    (lib / "gateway" / f"{sha256}.pyz").write_bytes(archive)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$TN_ARGV"\n')
    (bin_dir / "python3").chmod(0o755)
    recorded = tmp_path / "argv"
    invocation = run_document(
        ROOT / "ssm_documents" / "SyncNatTable.yaml",
        {**valid_parameters("SyncNatTable"), **parameters},
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "TUNNELNAT_LIB": str(lib),
            "TN_ARGV": str(recorded),
        },
        binding={"sha256": sha256, "bucket": "b-never-read", "key": "k", "region": "us-east-1"},
        timeout=20,
    )
    assert invocation.status == "Success", invocation.stderr
    package = str(lib / "gateway" / f"{sha256}.pyz")
    assert recorded.read_text().splitlines() == [
        package, "sync", "--table", "tunnelnat-table", "--region", "us-east-1", *argv
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("stem", "verb"),
    [("ConfigureTunnel", "configure-tunnel"), ("RestartTunnel", "restart-tunnel")],
)
def test_tunnel_documents_wait_for_cloud_init_then_run_their_verb(stem, verb):
    """The tunnel's work is the gateway software's (tests/unit/test_tunnel_verb.py: the token,
    lo, the restart on a new key, the lock): the document waits (bounded) for cloud-init's
    first-boot packages, installs the archive it was synthesized with if missing, then execs
    the verb with every parameter quoted as one argument."""
    script = _script(ROOT / "ssm_documents" / f"{stem}.yaml")
    assert script.startswith("#!/bin/bash\n")
    assert f'fail() {{ echo "{stem}: $*" >&2; exit 1; }}' in script
    waited = script.index("timeout 600 cloud-init status --wait")
    assert waited < script.index("if ! pkg_installed; then") < script.index(f'"$pkg" {verb} ')
    assert script.rstrip().splitlines()[-1].endswith('"') and "exec python3" in script
    # Nothing of the old script stays: no swanctl, ip or nft of its own, no forwarding.
    assert not re.search(r"\b(swanctl|ip|nft|flock|sysctl)\s", script)
    assert "tunnelnat_health" not in script and "ip_forward" not in script
