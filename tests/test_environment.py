"""The environment: the tested versions are the installed ones, and the private APIs used exist."""

import re
from importlib import metadata

import pytest

from conftest import REPO
from moe_ds import compat


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
            for m in (re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line) for line in lines) if m}


def test_every_requirement_is_pinned_and_installed_at_its_pin():
    pinned = pins()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?", line.strip())
        if not m or line.startswith("#"):
            continue
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        if name == "torch":  # pinned by .ci/bootstrap_venv.sh (CPU or CUDA build)
            continue
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert metadata.version(name) == pinned[name], f"{name}: installed {metadata.version(name)}, pinned {pinned[name]}"
    for package, version in compat.TESTED.items():
        assert pinned[package] == version


def test_private_apis_exist_and_a_missing_one_names_package_and_versions(monkeypatch):
    compat.require(*compat.PRIVATE_APIS)
    monkeypatch.setitem(compat.PRIVATE_APIS, "transformers.Trainer._no_such_method", "transformers")
    with pytest.raises(compat.CompatibilityError, match=r"^transformers \S+ has no transformers\.Trainer\."
                       r"_no_such_method, which moe-ds uses; moe-ds is tested with transformers==5\.23\.0"):
        compat.require("transformers.Trainer._no_such_method")
    assert not compat.require("transformers.Trainer._no_such_method", strict=False)  # logged, not raised
