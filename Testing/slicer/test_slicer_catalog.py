"""Ready for the Extensions Index (issue 25, section 6): the catalog entry, and every URL in one place.

Catalog/MetaSeg.json is the file to add to Slicer/ExtensionsIndex. Its format is Slicer's catalog-entry schema
v1.0.1 (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json at v5.10.0, the version the Index's entries
name), restated below; with METASEG_SLICER_SOURCE set, the schema is read from Slicer's own source as well.
The URLs and contributors live in MetaSegSlicer/Resources/extension.json only: CMake and the module read it,
and nothing else in the repository names the repository's address. While they are placeholders, the README says
so as the one step left before submission.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from mrml_helpers import MODULE_DIR, ROOT
from slicer_gui import slicer_source

CATALOG = ROOT / "Catalog" / "MetaSeg.json"
INFO = MODULE_DIR / "Resources" / "extension.json"
SCHEMA_PATH = "Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"
# the schema's properties (v1.0.1): required ones, and the type of each
REQUIRED = {"$schema", "category", "scm_url"}
PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
              "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def check_entry(entry, required=REQUIRED, properties=PROPERTIES):
    assert required <= set(entry), f"missing: {required - set(entry)}"
    assert set(entry) <= set(properties), f"not in the schema (additionalProperties: false): {set(entry) - set(properties)}"
    for key, kind in properties.items():
        if key in entry:
            assert isinstance(entry[key], kind), key
    assert 1 <= entry.get("tier", 1) <= 5
    assert entry.get("scm_type", "git") in ("git", "local")


def test_the_catalog_entry_follows_the_schema_and_the_extension():
    entry = json.loads(CATALOG.read_text(encoding="utf-8"))
    check_entry(entry)
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    info = json.loads(INFO.read_text(encoding="utf-8"))
    assert entry["category"] == info["category"] == "Segmentation"
    assert entry["build_dependencies"] == info["depends"] == ["PyTorch"]
    assert entry["scm_url"] == info["repository"] + ".git" and entry["scm_revision"] == info["branch"]


@pytest.mark.skipif(slicer_source() is None, reason="METASEG_SLICER_SOURCE (a Slicer git mirror or checkout) is not set")
def test_the_restated_schema_is_slicers():
    source = slicer_source()
    git = ["git", "--git-dir", source] if not (__import__("pathlib").Path(source) / ".git").exists() else ["git", "-C", source]
    schema = json.loads(subprocess.run(git + ["show", f"v5.10.0:{SCHEMA_PATH}"], capture_output=True, check=True,
                                       text=True).stdout)
    assert set(schema["required"]) == REQUIRED and schema["additionalProperties"] is False
    kinds = {"string": str, "array": list, "boolean": bool, "integer": int}
    assert {k: kinds[v["type"]] for k, v in schema["properties"].items()} == PROPERTIES
    check_entry(json.loads(CATALOG.read_text(encoding="utf-8")))


def test_every_url_of_the_extension_comes_from_one_place():
    import MetaSeg

    info = MetaSeg.extensionInfo()
    assert info["homepage"].startswith(info["repository"]) and MetaSeg.README_URL == info["homepage"]
    assert all(u.startswith("https://raw.githubusercontent.com/") for u in info["screenshots"] + [info["icon"]])
    for url in info["screenshots"] + [info["icon"]]:  # the files they name are in this repository
        path = url.split(f"/{info['branch']}/", 1)[1]
        assert (ROOT / path).is_file(), path
    assert all(re.search(r"\(.+\)", c) for c in info["contributors"]), "each contributor with an affiliation"
    host = info["repository"].split("://", 1)[1]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    named = [f for f in tracked if f.endswith((".py", ".txt", ".cmake", ".json", ".ui"))
             and host in (ROOT / f).read_text(encoding="utf-8", errors="replace")]
    assert sorted(named) == ["Catalog/MetaSeg.json", "MetaSegSlicer/Resources/extension.json"], named


def test_placeholders_are_stated_as_the_step_left_before_submission():
    info = json.loads(INFO.read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if info["placeholder"]:
        assert "One step is left before submitting to the Extensions Index" in readme
        assert "MetaSegSlicer/Resources/extension.json" in readme and '"placeholder"' in readme
    else:
        assert "placeholder" not in json.dumps(info["contributors"]) + info["repository"]
