"""Firmware profiles: every shipped profile validates; broken ones are refused with the field path
and the reason; the host comparison gives a decision with reasons."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.errors import BundleError, ProfileError
from edge_bundle.profile_host import HostInfo, matches_host, read_host
from edge_bundle.profiles import (
    HardwareProfile,
    known_profile_names,
    load_all_profiles,
    load_profile,
)
from firmware_profiles import PROFILE_DIR, profile_paths

REQUIRED_PROFILES = {
    "generic-x86-64-avx2",
    "rpi5-arm64",
    "jetson-orin-nano",
    "x86-t4-server",
    "intel-igpu",
}
BASE = "generic-x86-64-avx2"


def base_data() -> dict[str, Any]:
    with (PROFILE_DIR / f"{BASE}.toml").open("rb") as stream:
        return tomllib.load(stream)


def to_toml(data: dict[str, Any]) -> str:
    """A tiny TOML writer for the shapes profiles use (tables of scalars and lists, one level of
    nested tables)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return f'"{item}"'
        if isinstance(item, list):
            return "[" + ", ".join(value(i) for i in item) + "]"
        return repr(item)

    def table(prefix: str, body: dict[str, Any]) -> list[str]:
        lines = [f"[{prefix}]"] if prefix else []
        subtables = []
        for key, item in body.items():
            if isinstance(item, dict):
                subtables.append((f"{prefix}.{key}" if prefix else key, item))
            else:
                lines.append(f"{key} = {value(item)}")
        for name, sub in subtables:
            lines += table(name, sub)
        return lines

    return "\n".join(table("", data)) + "\n"


def write_profile(tmp_path: Path, data: dict[str, Any], stem: str = BASE) -> Path:
    path = tmp_path / f"{stem}.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    return str(caught.value)


# ---------------------------------------------------------------- shipped profiles


def test_the_required_profiles_are_shipped() -> None:
    assert set(known_profile_names()) >= REQUIRED_PROFILES


@pytest.mark.parametrize("path", profile_paths(), ids=lambda p: p.stem)
def test_every_shipped_profile_validates_and_is_named_after_its_file(path: Path) -> None:
    profile = load_profile(path.stem)
    assert isinstance(profile, HardwareProfile)
    assert profile.name == path.stem
    assert profile.onnx.execution_providers[-1] == "CPUExecutionProvider"
    assert profile.quantization.preferred_onnx in profile.quantization.allowed
    assert profile.quantization.preferred_gguf in profile.quantization.allowed
    assert profile.budgets.max_bundle_mb <= profile.budgets.memory_mb
    # every profile explains its choices in comments
    assert path.read_text(encoding="utf-8").lstrip().startswith("#")


def test_load_all_profiles_returns_every_file_by_name() -> None:
    profiles = load_all_profiles()
    assert set(profiles) == {p.stem for p in profile_paths()}
    assert profiles["jetson-orin-nano"].gpu is not None
    assert profiles["jetson-orin-nano"].gpu.vendor == "nvidia"
    assert profiles["intel-igpu"].onnx.execution_providers == (
        "OpenVINOExecutionProvider",
        "CPUExecutionProvider",
    )
    small = profiles[BASE]
    assert (small.cpu.cores, small.onnx.allow_spinning) == (2, False)
    assert small.onnx.execution_providers == ("CPUExecutionProvider",)


def test_profiles_are_frozen() -> None:
    profile = load_profile(BASE)
    with pytest.raises(ValueError, match="frozen"):
        setattr(profile, "name", "other")  # noqa: B010 (bypass the type checker on purpose)


def test_a_name_and_a_path_load_the_same_profile() -> None:
    assert load_profile(BASE) == load_profile(PROFILE_DIR / f"{BASE}.toml")
    assert load_profile(str(PROFILE_DIR / f"{BASE}.toml")) == load_profile(BASE)


# ---------------------------------------------------------------- refusals


def test_unknown_name_lists_the_known_names() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile("raspberry-pi-9")
    message = str(caught.value)
    assert "unknown firmware profile 'raspberry-pi-9'" in message
    for name in REQUIRED_PROFILES:
        assert name in message


def test_a_name_cannot_climb_out_of_the_profile_directory() -> None:
    with pytest.raises(ProfileError, match="unknown firmware profile"):
        load_profile("..")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert "does not exist" in refusal(tmp_path / "nowhere.toml")


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / f"{BASE}.toml"
    path.write_text('name = "x"\ndescription = "y"\n[cpu\narch = "x86_64"\n', encoding="utf-8")
    message = refusal(path)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "line 3" in message


def test_a_typo_in_a_field_name_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    data = base_data()
    data["onnx"]["intra_op_thread"] = data["onnx"].pop("intra_op_threads")
    message = refusal(write_profile(tmp_path, data))
    assert str(tmp_path) in message
    assert "onnx.intra_op_thread: unknown field; did you mean 'intra_op_threads'?" in message
    assert "onnx.intra_op_threads: required field is missing" in message


def test_an_unknown_top_level_table_is_refused(tmp_path: Path) -> None:
    data = base_data()
    data["gpus"] = {"vendor": "nvidia"}
    assert "gpus: unknown field; did you mean 'gpu'?" in refusal(write_profile(tmp_path, data))


def test_preferred_quantization_must_be_allowed(tmp_path: Path) -> None:
    data = base_data()
    data["quantization"]["preferred_gguf"] = "f16"
    message = refusal(write_profile(tmp_path, data))
    assert "quantization.preferred_gguf: 'f16' is not in quantization.allowed" in message


def test_cpu_provider_must_be_last(tmp_path: Path) -> None:
    data = base_data()
    data["onnx"]["execution_providers"] = ["CPUExecutionProvider", "OpenVINOExecutionProvider"]
    message = refusal(write_profile(tmp_path, data))
    assert "onnx.execution_providers: 'CPUExecutionProvider' must come last" in message


def test_an_unknown_provider_is_refused(tmp_path: Path) -> None:
    data = base_data()
    data["onnx"]["execution_providers"] = ["CudaExecutionProvider", "CPUExecutionProvider"]
    message = refusal(write_profile(tmp_path, data))
    assert "onnx.execution_providers[0]" in message
    assert "'CudaExecutionProvider'" in message


def test_negative_threads_are_refused(tmp_path: Path) -> None:
    data = base_data()
    data["onnx"]["intra_op_threads"] = -2
    message = refusal(write_profile(tmp_path, data))
    assert "onnx.intra_op_threads: Input should be greater than 0 (got -2)" in message


def test_threads_beyond_the_cores_are_refused(tmp_path: Path) -> None:
    data = base_data()
    data["llama"]["threads"] = 8
    message = refusal(write_profile(tmp_path, data))
    assert "llama.threads: 8 threads exceeds cpu.cores (2)" in message


def test_x86_features_on_aarch64_are_refused(tmp_path: Path) -> None:
    data = base_data()
    data["cpu"]["arch"] = "aarch64"
    message = refusal(write_profile(tmp_path, data))
    assert "cpu.features: 'avx2' is an x86_64 feature; aarch64 profiles may list:" in message
    assert "dotprod" in message


def test_a_string_where_a_number_belongs_is_refused(tmp_path: Path) -> None:
    data = base_data()
    data["cpu"]["cores"] = "2"
    assert "cpu.cores: Input should be a valid integer" in refusal(write_profile(tmp_path, data))


def test_cuda_provider_needs_an_nvidia_gpu(tmp_path: Path) -> None:
    data = base_data()
    data["onnx"]["execution_providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    message = refusal(write_profile(tmp_path, data))
    assert "onnx.execution_providers: CUDAExecutionProvider needs a [gpu] section" in message
    assert 'vendor = "nvidia"' in message


def test_gpu_layers_need_a_gpu_build(tmp_path: Path) -> None:
    data = base_data()
    data["llama"]["gpu_layers"] = -1
    message = refusal(write_profile(tmp_path, data))
    assert "llama.gpu_layers: -1 offloads layers" in message


def test_options_for_an_unlisted_provider_are_refused(tmp_path: Path) -> None:
    data = base_data()
    data["onnx"]["provider_options"] = {"CUDAExecutionProvider": {"device_id": 0}}
    message = refusal(write_profile(tmp_path, data))
    assert "onnx.provider_options: options given for 'CUDAExecutionProvider'" in message


def test_a_bundle_larger_than_the_memory_budget_is_refused(tmp_path: Path) -> None:
    data = base_data()
    data["budgets"]["max_bundle_mb"] = 4096
    message = refusal(write_profile(tmp_path, data))
    assert "budgets.max_bundle_mb: 4096 MB exceeds budgets.memory_mb (3072 MB)" in message


def test_the_name_must_match_the_file(tmp_path: Path) -> None:
    message = refusal(write_profile(tmp_path, base_data(), stem="renamed"))
    assert "name: 'generic-x86-64-avx2' must match the file name 'renamed'" in message


def test_a_missing_section_is_refused(tmp_path: Path) -> None:
    data = base_data()
    del data["budgets"]
    assert "budgets: required field is missing" in refusal(write_profile(tmp_path, data))


def test_profile_error_belongs_to_the_one_error_tree() -> None:
    assert issubclass(ProfileError, BundleError)


def test_load_all_profiles_refuses_a_directory_with_a_broken_profile(tmp_path: Path) -> None:
    data = base_data()
    data["schema_version"] = 2
    write_profile(tmp_path, data)
    with pytest.raises(ProfileError, match="schema_version"):
        load_all_profiles(tmp_path)


# ---------------------------------------------------------------- host comparison


def test_the_target_host_matches_with_a_summary() -> None:
    profile = load_profile(BASE)
    host = HostInfo("x86_64", frozenset({"avx2", "fma", "f16c"}), 2)
    decision = matches_host(profile, host)
    assert decision.matches
    assert decision.reasons and "matches profile 'generic-x86-64-avx2'" in decision.reasons[0]


def test_a_different_host_does_not_match_and_says_why() -> None:
    profile = load_profile(BASE)
    host = HostInfo("x86_64", frozenset({"avx2", "fma", "f16c", "avx512_vnni"}), 16)
    decision = matches_host(profile, host)
    assert not decision.matches
    joined = " | ".join(decision.reasons)
    assert "avx512_vnni" in joined
    assert "16 usable cores" in joined


def test_arch_missing_features_and_gpu_are_reported() -> None:
    profile = load_profile("jetson-orin-nano")
    host = HostInfo("x86_64", frozenset({"avx2"}), 6)
    reasons = " | ".join(matches_host(profile, host).reasons)
    assert "host is x86_64, profile targets aarch64" in reasons
    assert "no nvidia GPU" in reasons
    same_arch = HostInfo("aarch64", frozenset({"neon"}), 6, frozenset({"nvidia"}))
    decision = matches_host(profile, same_arch)
    assert decision.reasons == ["host lacks CPU features dotprod, fp16"]


def test_this_machine_can_be_described_and_compared() -> None:
    host = read_host()
    assert host.cores >= 1
    decision = matches_host(load_profile(BASE))
    assert isinstance(decision.matches, bool)
    assert decision.reasons
    if host.arch == "x86_64":
        assert matches_host(load_profile("rpi5-arm64")).matches is False


def test_read_host_parses_arm_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimdhp cpuid asimddp\n",
        encoding="utf-8",
    )
    host = read_host(cpuinfo, machine="arm64")
    assert host.arch == "aarch64"
    assert host.features == {"neon", "fp16", "dotprod"}
    decision = matches_host(load_profile("rpi5-arm64"), HostInfo(host.arch, host.features, 4))
    assert decision.matches, decision.reasons


def test_read_host_parses_x86_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n", encoding="utf-8"
    )
    host = read_host(cpuinfo, machine="AMD64")
    assert host.arch == "x86_64"
    assert host.features == frozenset({"avx2", "fma", "f16c"})
