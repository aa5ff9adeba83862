"""Every refusal of the core reaches the panel worded for the person reading it (issue 25, section 3).

The core's messages speak to the command line ("pass --accept-poor-match", "--mask"); its error event also
names the refusal (`reason`) and its numbers (`facts`). MetaSegLib.refusals words each reason for the panel.
These tests hold the two sides together: every reason the core's source can raise has panel wording, and no
panel wording names a command-line option. No Qt, no MRML, no child process.
"""
from __future__ import annotations

import ast
import json

import pytest

from mrml_helpers import ROOT
from MetaSegLib import refusals

CORE = ROOT / "MetaSegCore" / "metaseg"

# facts as the core sends them, for every reason (and every cause of a poor match)
EXAMPLES = [
    {"reason": "poor_match", "facts": {"dims": 3, "ncc": 0.21, "ncc_interior": -0.4, "cause": "inverted_contrast"}},
    {"reason": "poor_match", "facts": {"dims": 3, "ncc": 0.5, "ncc_interior": 0.3, "cause": "whole_head", "litres": 3.2}},
    {"reason": "poor_match", "facts": {"dims": 3, "ncc": 0.4, "ncc_interior": 0.2, "cause": "flipped_axis", "axis": "j"}},
    {"reason": "poor_match", "facts": {"dims": 3, "ncc": 0.1, "ncc_interior": 0.1, "cause": "unknown"}},
    {"reason": "poor_match", "facts": {"dims": 2, "ncc": 0.41}},
    {"reason": "slice_too_large", "facts": {"width": 300, "height": 300}},
    {"reason": "needs_3d", "facts": {"option": "--mask"}},
    {"reason": "needs_3d", "facts": {"option": "--uncertainty"}},
    {"reason": "mask_geometry", "facts": {"why": "size differs"}},
    {"reason": "mask_misses_brain", "facts": {}},
    {"reason": "mask_and_extraction", "facts": {}},
    {"reason": "empty_scan", "facts": {}},
    {"reason": "binary_image", "facts": {}},
    {"reason": "needs_deepbet", "facts": {}},
    {"reason": "deepbet_damaged", "facts": {"version": "1.0.2"}},
    {"reason": "two_objects", "facts": {"ml": 2313, "first_ml": 1400}},
    {"reason": "no_brain_found", "facts": {"ml": 12}},
    {"reason": "too_much_brain", "facts": {"ml": 2900, "max_ml": 2500}},
    {"reason": "looks_like_ct", "facts": {"percent_air": 61}},
    {"reason": "device_unavailable", "facts": {"device": "gpu"}},
    {"reason": "unexpected", "facts": {}},
]


def core_reasons():
    """Every `reason="..."` keyword given to an InputError in the core's source."""
    found = {}
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "reason" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                        found.setdefault(kw.value.value, []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_reason_the_core_raises_is_declared_and_worded_for_the_panel():
    from metaseg.io.progress import REASONS

    raised = core_reasons()
    assert set(raised) - set(REASONS) == set(), "reasons raised but not declared in metaseg/io/progress.py REASONS"
    assert set(REASONS) - set(raised) == set(), "reasons declared but raised nowhere"
    assert set(REASONS) == set(refusals.WORDING), "every reason needs its panel wording in MetaSegLib/refusals.py"
    assert {e["reason"] for e in EXAMPLES} == set(REASONS)


def test_refusals_that_reach_the_panel_carry_a_reason():
    """Every InputError of the modules a panel run goes through that names a command-line option carries a reason,
    so the panel can word it. (Left out: the command line's own checks of output files and arguments, which the
    module's fixed job file never trips: cli, live, output_paths, atomic, batch, cohort, prepare, data, train.)"""
    panel_path = {"brain.py", "volume.py", "segmenter.py", "segmentation.py", "plausibility.py", "readers.py", "images.py",
                  "registration.py", "bias.py", "preprocess.py", "geometry.py", "mgz.py", "nifti_check.py",
                  "device.py", "pipeline.py"}
    missing = []
    for path in sorted(CORE.rglob("*.py")):
        if path.name not in panel_path:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InputError" and node.args):
                continue
            text = "".join(part.value for part in ast.walk(node.args[0])
                           if isinstance(part, ast.Constant) and isinstance(part.value, str))
            if refusals.CLI_OPTION.search(text) and not any(kw.arg == "reason" for kw in node.keywords):
                if not any(path.name == name and part in text for name, part in ARGUMENT_CHECKS):
                    missing.append(f"{path.name}:{node.lineno}: {text[:70]}")
    assert missing == []


# checks of the command line's own arguments that the module's job file cannot fail: it always asks for --force
# (its run folder is its own) and a live-preview interval of 0 or more
ARGUMENT_CHECKS = (("pipeline.py", "--live-every must be"), ("segmentation.py", "pass --force to overwrite"))


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: f"{e['reason']}-{e['facts'].get('cause', e['facts'].get('option', ''))}")
def test_panel_wording_names_no_command_line_option(event):
    core_message = "the scan ...; pass --accept-poor-match to segment it anyway, or pass --mask"
    failure = refusals.explain({"message": core_message, "exit_code": 2, **event})
    assert not refusals.CLI_OPTION.search(failure.text), failure.text
    for fact in event["facts"].values():
        if isinstance(fact, (int, float)) and not isinstance(fact, bool) and event["reason"] != "poor_match":
            assert str(fact) in failure.text, (fact, failure.text)
    assert failure.details.startswith(core_message)  # the core's own words stay available, behind "details"
    assert failure.reason == event["reason"]
    assert (refusals.SEGMENT_ANYWAY in failure.actions) == (event["reason"] == "poor_match")


def test_messages_without_a_reason_and_crashes():
    plain = refusals.explain({"message": "the weights file is damaged", "exit_code": 2})
    assert plain.text == "MetaSeg could not segment this volume: the weights file is damaged." and plain.actions == ()
    flagged = refusals.explain({"message": "pass --weights FILE", "exit_code": 2})
    assert "--weights" not in flagged.text and flagged.details == "pass --weights FILE"
    crash = refusals.explain({"message": "The MetaSeg process exited with code 1.", "crash": True,
                              "details": "Traceback (most recent call last):\n  ...\nMemoryError"})
    assert "ended unexpectedly" in crash.text and "Traceback" not in crash.text and "MemoryError" in crash.details
    fault = refusals.explain({"message": "RuntimeError: boom", "reason": "unexpected", "exit_code": 1,
                              "traceback": "Traceback (most recent call last):\n  File ...\nRuntimeError: boom"})
    assert "internal error" in fault.text and "Traceback" not in fault.text
    assert fault.details.startswith("RuntimeError: boom") and "Traceback (most recent call last)" in fault.details
    render = refusals.explain({"message": "the plane is too large"}, what="render the cross-section")
    assert render.text.startswith("MetaSeg could not render the cross-section")


def test_the_cores_error_event_carries_reason_facts_and_a_traceback(tmp_path, monkeypatch, capsys):
    """In the core: a refusal's event names its reason and facts; a fault's event has its traceback (and the
    command line still ends with the traceback on stderr, exit code 1 through the exception)."""
    import SimpleITK as sitk

    from metaseg import pipeline
    from metaseg.io.readers import InputError
    from metaseg.options import Outputs, SegmentOptions

    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkFloat32), str(scan))

    def refuse(self, *args, **kwargs):
        raise InputError("... pass --accept-poor-match to segment it anyway", reason="poor_match", dims=3, ncc=0.2)

    monkeypatch.setattr(pipeline.Segmenter, "run", refuse)
    outputs = Outputs(labels=str(tmp_path / "l.nii.gz"))
    assert pipeline.segment_file(scan, outputs, SegmentOptions(device="cpu"), "json") == 2
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["event"] == "error" and event["reason"] == "poor_match" and event["facts"] == {"dims": 3, "ncc": 0.2}

    def fault(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline.Segmenter, "run", fault)
    with pytest.raises(RuntimeError):
        pipeline.segment_file(scan, outputs, SegmentOptions(device="cpu"), "json")
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["reason"] == "unexpected" and event["exit_code"] == 1 and "RuntimeError: boom" in event["traceback"]


def test_the_panels_step_limit_is_the_cores(slicer_core):
    """A number of steps the core would refuse ("--steps must be between ...") cannot be set in the panel."""
    import re

    import MetaSeg
    from metaseg.options import MAX_STEPS

    from mrml_helpers import MODULE_DIR

    assert MetaSeg.MAX_STEPS == MAX_STEPS
    code = (MODULE_DIR / "MetaSeg.py").read_text(encoding="utf-8")
    assert f"steps: Annotated[int, WithinRange(0, {MAX_STEPS})]" in code
    ui = (MODULE_DIR / "Resources" / "UI" / "MetaSeg.ui").read_text(encoding="utf-8")
    spin = ui[ui.index('name="stepsSpinBox"'):]
    assert re.search(r'<property name="maximum">\s*<number>(\d+)</number>', spin).group(1) == str(MAX_STEPS)
