"""The gateway software's installation: gateway/install_package.py (the fetcher every gateway
document embeds and the user data runs) against moto's S3 and SSM, and the package's own
``activate`` verb (the units' link, pruning, the pair agent) on a real archive.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import install_package
import pytest
from moto import mock_aws

from tests.unit.imports import third_party_imports
from tools.gateway_package import CORE_MODULES, build
from tunnelnat_gateway import activate

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "gateway" / "install_package.py"
REGION = "eu-west-1"
BUCKET = "cdk-hnb659fds-assets-123456789012-eu-west-1"
PARAMETER = "/tunnelnat/lab/gateway-software"


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@pytest.fixture
def aws(monkeypatch, tmp_path):
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("TUNNELNAT_LIB", str(tmp_path / "lib"))
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield s3


def upload(s3, body: bytes) -> str:
    key = f"{sha(body)}.pyz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return key


def fetch(capsys, *argv: str) -> Path:
    assert install_package.main(list(argv)) == 0
    return Path(capsys.readouterr().out.strip())


def test_fetches_content_addressed_and_executable(aws, tmp_path, capsys):
    body = b"#!/usr/bin/env python3\n" + b"x" * 1000
    key = upload(aws, body)
    path = fetch(
        capsys, "--bucket", BUCKET, "--key", key, "--sha256", sha(body), "--region", REGION
    )
    assert path == tmp_path / "lib" / "gateway" / f"{sha(body)}.pyz"
    assert path.read_bytes() == body and path.stat().st_mode & 0o777 == 0o755
    assert not list((tmp_path / "lib").rglob("*.tmp"))
    # Standard retries unless the environment says otherwise.
    assert os.environ["AWS_RETRY_MODE"] == "standard" and os.environ["AWS_MAX_ATTEMPTS"] == "10"


def test_a_download_with_another_sha256_is_refused_and_nothing_is_written(aws, tmp_path):
    body = b"the package"
    key = upload(aws, body)
    for wanted in ("0" * 64, "../../etc/passwd", sha(body)[:63]):
        with pytest.raises(SystemExit, match=f"the archive is {sha(body)}, not"):
            install_package.main(
                ["--bucket", BUCKET, "--key", key, "--sha256", wanted, "--region", REGION]
            )
    assert not (tmp_path / "lib").exists()


def test_a_half_written_archive_is_never_seen_under_its_name(aws, tmp_path, monkeypatch, capsys):
    """Written beside itself, synced, renamed: a crash mid-write leaves the name absent, never
    a partial archive a document would run."""
    body = b"the package"
    key = upload(aws, body)
    argv = ["--bucket", BUCKET, "--key", key, "--sha256", sha(body), "--region", REGION]

    def crash(fd):
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(install_package.os, "fsync", crash)
        with pytest.raises(OSError, match="power cut"):
            install_package.main(argv)
    assert not (tmp_path / "lib" / "gateway" / f"{sha(body)}.pyz").exists()
    assert fetch(capsys, *argv).read_bytes() == body


def test_the_parameter_names_the_archive(aws, capsys):
    body = b"the package"
    key = upload(aws, body)
    value = {"sha256": sha(body), "version": "0.1.0+x", "bucket": BUCKET, "key": key}
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name=PARAMETER, Value=json.dumps(value | {"region": REGION}), Type="String"
    )
    path = fetch(capsys, "--parameter", PARAMETER, "--region", REGION)
    assert path.read_bytes() == body


def test_a_missing_argument_or_a_parameter_that_is_not_the_software_s_json_fails(aws):
    with pytest.raises(KeyError, match="--key"):
        install_package.main(["--bucket", BUCKET, "--sha256", "0" * 64, "--region", REGION])
    ssm = boto3.client("ssm", region_name=REGION)
    for broken, error in (("not json", ValueError), ('["a"]', ValueError), ("{}", KeyError)):
        ssm.put_parameter(Name=PARAMETER, Value=broken, Type="String", Overwrite=True)
        with pytest.raises(error):
            install_package.main(["--parameter", PARAMETER, "--region", REGION])


def test_the_fetcher_uses_only_the_standard_library_and_boto3():
    assert third_party_imports(INSTALLER) == {"boto3"}
    # It runs from stdin, with nothing of the repository on the path, as documents run it.
    proc = subprocess.run(
        [sys.executable, "-I", "-", "--region"],
        input=INSTALLER.read_text(),
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 1 and "KeyError" in proc.stderr, proc.stderr


def test_the_compact_copy_documents_embed_is_the_same_program_and_small():
    """What tools/build_documents.py embeds in gateway documents: the fetcher without
    docstrings, comments and annotations, the same program otherwise, and small enough that a
    gateway document with many parameters stays within 8 KB."""
    from tools.build_documents import embedded, strip_tree

    compact = embedded("gateway/install_package.py")
    assert ast.dump(ast.parse(compact)) == ast.dump(strip_tree(ast.parse(INSTALLER.read_text())))
    assert len(json.dumps(compact)) <= 1300
    assert len(json.dumps(embedded("gateway/package_check.sh"))) <= 700
    assert "{{" not in compact


# -- activate: the package's verb -----------------------------------------------------------------


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Two real archives (the second from sources one line apart), as a gateway would have them."""
    root = tmp_path_factory.mktemp("sources")
    import shutil

    shutil.copytree(REPO / "gateway" / "tunnelnat_gateway", root / "gateway" / "tunnelnat_gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in CORE_MODULES:  # what build() reads
        target = root / "lambdas" / "tunnelnat" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "lambdas" / "tunnelnat" / name, target)
    shutil.copyfile(REPO / "pyproject.toml", root / "pyproject.toml")
    one = build(root / "out1", root=root)
    marker = root / "gateway" / "tunnelnat_gateway" / "software.py"
    marker.write_text(marker.read_text() + "\n# another build\n")
    two = build(root / "out2", root=root)
    assert one.sha256 != two.sha256
    return one, two


def place(lib: Path, package) -> Path:
    path = lib / "gateway" / f"{package.sha256}.pyz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(package.path.read_bytes())
    return path


def test_activate_points_the_units_link_at_the_archive(packages, tmp_path):
    one, two = packages
    lib = tmp_path / "lib"
    first = activate.activate(place(lib, one))
    assert first == {
        "installed": str(lib / "gateway" / f"{one.sha256}.pyz"),
        "version": one.version,
        "sha256": one.sha256,
        "previous": None,
        "changed": True,
        "pair_agent": None,
    }
    link = lib / "tunnelnat-gateway.pyz"
    # Relative: the lib directory may be looked at from elsewhere (a chroot, the lab's /etc).
    assert os.readlink(link) == f"gateway/{one.sha256}.pyz"
    second = activate.activate(place(lib, two))
    assert (second["previous"], second["changed"]) == (one.sha256, True)
    assert link.read_bytes() == two.path.read_bytes()
    again = activate.activate(lib / "gateway" / f"{two.sha256}.pyz")
    assert (again["previous"], again["changed"]) == (two.sha256, False)
    assert not [p for p in lib.rglob("*.tmp")]
    # The previous archive stays: a document running it keeps its file.
    assert (lib / "gateway" / f"{one.sha256}.pyz").exists()


def test_activate_refuses_an_archive_that_is_not_its_name(packages, tmp_path):
    one, two = packages
    lib = tmp_path / "lib"
    wrong = lib / "gateway" / f"{one.sha256}.pyz"
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(two.path.read_bytes())
    with pytest.raises(activate.ActivateError, match=f"is {two.sha256}, not {one.sha256}"):
        activate.activate(wrong)
    assert not (lib / "tunnelnat-gateway.pyz").exists()


def test_the_verb_runs_from_the_archive_and_prints_its_line(packages, tmp_path):
    one, _ = packages
    lib = tmp_path / "lib"
    archive = place(lib, one)
    proc = subprocess.run(
        [sys.executable, "-I", str(archive), "activate", "--restart-pair-agent"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["sha256"] == one.sha256 and line["changed"] is True
    # This machine's PID 1 is not systemd (nor the lab's): nothing is restarted, and it says so.
    assert line["pair_agent"] == "no systemd"
    # From a source tree there is no archive to activate.
    assert activate.main([]) == 1


def test_the_pair_agent_is_restarted_only_when_the_package_changed_and_it_runs(packages, tmp_path):
    one, two = packages
    lib = tmp_path / "lib"
    calls: list[list[str]] = []

    def systemctl(argv, active=True):
        calls.append(argv)
        return 0 if active or argv[0] != "is-active" else 3

    line = activate.activate(place(lib, one), restart=True, systemctl=systemctl, systemd=True)
    assert line["pair_agent"] == "restarted"
    assert calls == [
        ["is-active", "--quiet", "tunnelnat-pair.service"],
        ["try-restart", "tunnelnat-pair.service"],
    ]
    calls.clear()
    line = activate.activate(place(lib, one), restart=True, systemctl=systemctl, systemd=True)
    assert (line["pair_agent"], calls) == ("unchanged", [])
    line = activate.activate(
        place(lib, two),
        restart=True,
        systemctl=lambda argv: systemctl(argv, active=False),
        systemd=True,
    )
    assert line["pair_agent"] == "not running"
    assert ["try-restart", "tunnelnat-pair.service"] not in calls
    line = activate.activate(place(lib, one), restart=True, systemctl=systemctl, systemd=False)
    assert line["pair_agent"] == "no systemd"
    with pytest.raises(activate.ActivateError, match="does not restart"):
        activate.activate(
            place(lib, two),
            restart=True,
            systemctl=lambda argv: 0 if argv[0] == "is-active" else 1,
            systemd=True,
        )


def test_old_archives_are_pruned_but_current_previous_and_young_ones_stay(tmp_path):
    versions = tmp_path / "gateway"
    versions.mkdir()
    now = time.time()
    names = [f"{n:064x}" for n in range(6)]
    for age, name in enumerate(reversed(names)):  # names[0] the oldest
        path = versions / f"{name}.pyz"
        path.write_bytes(b"x")
        os.utime(path, (now - 3600 * (age + 1),) * 2)
    removed = activate.prune(versions, keep={names[-1], names[0]}, now=now)
    # The KEEP newest stay, and the one kept by name (the previous) however old.
    assert sorted(removed) == sorted(f"{n}.pyz" for n in names[1:3])
    young = versions / f"{'f' * 64}.pyz"
    young.write_bytes(b"x")
    os.utime(young, (now - 3600 * 10,) * 2)
    assert f"{'f' * 64}.pyz" in activate.prune(versions, keep=set(), now=now)
    fresh = versions / f"{'e' * 64}.pyz"
    fresh.write_bytes(b"x")
    os.utime(fresh, (now - 3600 * 10,) * 2)
    assert activate.prune(versions, keep=set(), now=now - 3600 * 10 + 30) == []


# -- what make documents embeds -------------------------------------------------------------------


def test_documents_embed_only_what_instances_run_and_the_two_shared_pieces(tmp_path):
    from tools.build_documents import EmbedError, expand

    def document(path: str) -> str:
        return f"          # >>> embed {path}\n          # <<< embed\n"

    for path in ("gateway/tunnelnat_gateway/boot.py", "lambdas/tunnelnat/core/nat.py"):
        with pytest.raises(EmbedError, match="documents embed only"):
            expand(document(path))
    for path in ("gateway/install_package.py", "gateway/package_check.sh"):
        assert "__TUNNELNAT_PACKAGE_" in expand(document(path)) or path.endswith(".py")
    # SSM would substitute "{{": refused in any embedded file.
    (tmp_path / "instance").mkdir()
    (tmp_path / "instance" / "x.py").write_text('print("{{ Param }}")\n')
    with pytest.raises(EmbedError, match="which SSM would substitute"):
        expand(document("instance/x.py"), root=tmp_path)


def test_a_failed_first_install_marks_the_gateway_unhealthy(monkeypatch):
    """gateway/mark_unhealthy.py, the user data's last step when the install fails: the instance
    IMDS names is marked Unhealthy in its group, so Auto Scaling replaces it."""
    import mark_unhealthy

    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        image = ec2.describe_images()["Images"][0]["ImageId"]
        autoscaling = boto3.client("autoscaling", region_name=REGION)
        autoscaling.create_launch_configuration(
            LaunchConfigurationName="gw", ImageId=image, InstanceType="t3.small"
        )
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName="x-gateway",
            LaunchConfigurationName="gw",
            MinSize=1,
            MaxSize=1,
            AvailabilityZones=[f"{REGION}a"],
        )
        (instance,) = autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"][0][
            "Instances"
        ]
        asked = []
        monkeypatch.setattr(
            mark_unhealthy, "imds", lambda path: asked.append(path) or instance["InstanceId"]
        )
        assert mark_unhealthy.main([REGION, "the gateway software could not be installed"]) == 0
        assert asked == ["/latest/meta-data/instance-id"]
        (after,) = autoscaling.describe_auto_scaling_instances()["AutoScalingInstances"]
        assert after["HealthStatus"].upper() == "UNHEALTHY"
    assert mark_unhealthy.main([REGION]) == 2
    assert third_party_imports(REPO / "gateway" / "mark_unhealthy.py") == {"boto3", "botocore"}
