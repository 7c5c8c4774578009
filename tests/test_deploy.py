"""deploy/: what can be checked without systemd, Docker or Kubernetes running. The capability
list is one list, the same in the unit, the DaemonSet, the Dockerfile and docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from tests.support import BOUNDED, unavailable

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "xdpturn.service"
CAPABILITIES = {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_NET_BIND_SERVICE"}


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_capabilities_are_the_documented_ones() -> None:
    settings = unit_settings()
    assert set(settings["AmbientCapabilities"][0].split()) == CAPABILITIES
    assert set(settings["CapabilityBoundingSet"][0].split()) == CAPABILITIES
    docs = (ROOT / "docs" / "operations.md").read_text()
    documented = re.search(r"^Capabilities: `([A-Z_ ]+)`", docs, re.MULTILINE)
    assert documented is not None and set(documented.group(1).split()) == CAPABILITIES
    assert "CAP_SYS_ADMIN" not in settings["AmbientCapabilities"][0]


def test_unit_allows_bpf_and_netlink_and_outlasts_the_drain() -> None:
    settings = unit_settings()
    assert "bpf" in settings["SystemCallFilter"][0].split()
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"][0].split()
    assert "PrivateNetwork" not in settings and "PrivateUsers" not in settings
    assert settings["DynamicUser"] == ["yes"]
    assert settings["ExecStart"][0].endswith("serve --config /etc/xdpturn/xdpturn.toml")
    example = tomllib.loads((DEPLOY / "xdpturn.toml").read_text())
    assert int(settings["TimeoutStopSec"][0]) > example["drain_timeout"]  # for a drain (SIGTERM)


def test_unit_and_daemonset_restart_without_dropping_media() -> None:
    """A restart is a stop for a restart (SIGINT with a state directory), with pins on the host's
    bpffs (docs/operations.md, "Upgrading a relay without dropping calls")."""
    settings = unit_settings()
    assert settings["KillSignal"] == ["SIGINT"]
    state_dir = "/var/lib/" + settings["StateDirectory"][0]
    assert f"XDPTURN_STATE_DIR={state_dir}" in settings["Environment"]
    # Every worker's allocations are kept: the unit runs the default, one worker per CPU.
    assert not any("XDPTURN_WORKERS" in e for e in settings["Environment"])
    assert settings["ReadWritePaths"] == ["-/sys/fs/bpf/xdpturn"]  # made by ExecStartPre
    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    assert re.search(r"- name: XDPTURN_STATE_DIR\n\s+value: /var/lib/xdpturn\n", text)
    assert "hostPath: {path: /var/lib/xdpturn, type: DirectoryOrCreate}" in text
    assert "hostPath: {path: /sys/fs/bpf, type: Directory}" in text
    assert "kill -INT 1" in text
    assert "XDPTURN_WORKERS" not in text
    assert (
        "Upgrading a relay without dropping calls" in (ROOT / "docs" / "operations.md").read_text()
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze is not installed")
    # verify wants ExecStart's binary to exist; the package is not installed system-wide here.
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/xdpturn", "ExecStart=/bin/true")
    unit = tmp_path / "xdpturn.service"
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=BOUNDED
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_daemonset_uses_host_network_and_the_same_capabilities() -> None:
    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    assert re.search(r"^\s+hostNetwork: true$", text, re.MULTILINE)
    assert "kind: DaemonSet" in text and "privileged: true" not in text
    added = re.search(r"add: \[([^\]]*)\]", text)
    assert added is not None
    assert {"CAP_" + c.strip(' "') for c in added.group(1).split(",")} == CAPABILITIES
    assert 'drop: ["ALL"]' in text
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
    example = tomllib.loads((DEPLOY / "xdpturn.toml").read_text())
    assert grace is not None and int(grace.group(1)) > example["drain_timeout"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert re.search(rf"{probe}:\n\s+httpGet: {{path: {path}, port: 9478}}", text)


def test_dockerfile_builds_the_bpf_object_on_debian_12_and_serves() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.MULTILINE) == ["debian:12-slim"] * 2
    assert "make -s -C src/xdpturn/fastpath/bpf" in text
    assert 'ENTRYPOINT ["xdpturn", "serve"]' in text
    cap_adds = set(re.findall(r"--cap-add (\w+)", text))
    # Docker grants NET_BIND_SERVICE by default; the rest must be added.
    assert {"CAP_" + c for c in cap_adds} == CAPABILITIES - {"CAP_NET_BIND_SERVICE"}
