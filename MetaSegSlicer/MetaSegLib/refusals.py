"""What a failed run tells the person at the MetaSeg panel, and what the panel offers them.

The core refuses what it should not segment with a message in the command line's words ("pass
--accept-poor-match", "--mask", "--brain-extraction off"). Its error event also names the refusal
(`reason`) and the numbers it quotes (`facts`; the list is REASONS in the core's progress.py), and
`explain` words each reason here for the panel: what was found, that nothing was segmented, and
what to do *in the panel* (Segment anyway, Advanced > Brain mask, Advanced > Brain extraction,
Device). The core's own message, and a traceback or the child's last output where there is one,
go to `details` (the dialog's "Show Details..."). A message without a reason is shown as it is
unless it names a command-line option; then the panel says so in general words and puts the
message under details.

No Qt, no MRML: tested on its own (Testing/slicer/test_slicer_refusals.py checks that every reason
the core can send has its wording here, and that no panel text names a command-line option).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

SEGMENT_ANYWAY = "segment_anyway"  # the panel's "Segment anyway" (accept_poor_match for one run)
SHOW_ADVANCED = "show_advanced"  # the fix is a field of the Advanced section: the panel opens it

CLI_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]+")

NOTHING = "Nothing was segmented."
ANYWAY = ("If you are sure that it is a T1-weighted brain MRI, press Segment anyway: the result is then "
          "likely wrong and must be checked.")
BRAIN_MASK = "choose the brain mask of this scan under Advanced > Brain mask"


@dataclass(frozen=True)
class Failure:
    """A failed run as the panel shows it: `text` (the dialog's message and the status line), `details`
    (the core's own message and any traceback: behind "Show Details..."), `actions` (SEGMENT_ANYWAY,
    SHOW_ADVANCED) and the core's `reason` (None when it gave none)."""

    text: str
    details: str = ""
    actions: Tuple[str, ...] = ()
    reason: Optional[str] = None

    def __str__(self) -> str:
        return self.text


def _poor_match(f: Mapping[str, Any]) -> Tuple[str, Tuple[str, ...]]:
    ncc = f.get("ncc")
    if f.get("dims") == 2:
        return (f"This slice does not look like the aligned coronal brain slice that the 2D model takes (match "
                f"{_num(ncc)}; aligned slices score 0.78 or more). {NOTHING} Load the whole 3D scan and segment it "
                f"instead. {ANYWAY}"), (SEGMENT_ANYWAY,)
    head = (f"This scan does not match the T1-weighted brain MRI that MetaSeg was trained on (match {_num(ncc)} after "
            f"registration; T1 brain scans score about 0.90). {NOTHING}")
    cause = f.get("cause")
    actions: Tuple[str, ...] = (SEGMENT_ANYWAY,)
    if cause == "whole_head":
        why = (f"It holds {_num(f.get('litres'), 1)} L of tissue, more than a brain: it seems to still have its skull, "
               f"neck or background noise. Set Advanced > Brain extraction to on, or {BRAIN_MASK}.")
        actions += (SHOW_ADVANCED,)
    elif cause == "inverted_contrast":
        why = ("Its tissue contrast looks inverted (dark white matter, bright fluid): is it a T2-weighted or FLAIR "
               "scan? MetaSeg needs a T1-weighted scan.")
    elif cause == "flipped_axis":
        why = (f"The orientation stored in its file looks wrong: the image matches once its voxel axis "
               f"{f.get('axis', '?')} is mirrored. Correct the volume's orientation, save it and try again.")
    else:
        why = ("Is it a T1-weighted MRI of the whole brain (not another kind of scan, noise, or part of the head)? "
               f"If it still has its skull, {BRAIN_MASK}.")
        actions += (SHOW_ADVANCED,)
    return f"{head} {why} {ANYWAY}", actions


def _needs_3d(f: Mapping[str, Any]) -> Tuple[str, Tuple[str, ...]]:
    option = f.get("option")
    if option == "--mask":
        return ("A brain mask is used for 3D scans only, and this input is a single slice. Clear Advanced > Brain "
                "mask and press Segment again."), (SHOW_ADVANCED,)
    return "This input is a single slice; the setting used applies to 3D scans only.", (SHOW_ADVANCED,)


def _num(value: Any, digits: int = 2) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "?"


# reason -> facts -> (text, actions)
WORDING: Dict[str, Callable[[Mapping[str, Any]], Tuple[str, Tuple[str, ...]]]] = {
    "poor_match": _poor_match,
    "slice_too_large": lambda f: (
        f"This image ({f.get('width', '?')}×{f.get('height', '?')} pixels) is larger than the slices the 2D model "
        f"takes (at most 160×192 pixels of 1 mm). {NOTHING} Load the whole 3D scan and segment it instead.", ()),
    "needs_3d": _needs_3d,
    "mask_geometry": lambda f: (
        f"The brain mask could not be placed on this scan's grid ({f.get('why', 'another geometry')}). {NOTHING} "
        "Choose a brain mask that covers this scan under Advanced > Brain mask, or clear it.", (SHOW_ADVANCED,)),
    "mask_misses_brain": lambda f: (
        "The selected brain mask does not cover the brain of this scan: no brain voxel lies inside it. "
        f"{NOTHING} Choose the brain mask that belongs to this scan under Advanced > Brain mask, or clear it.",
        (SHOW_ADVANCED,)),
    "mask_and_extraction": lambda f: (
        "A brain mask is selected and Brain extraction is set to on, but the mask already gives the brain. "
        f"{NOTHING} Set Advanced > Brain extraction to auto, or clear the brain mask.", (SHOW_ADVANCED,)),
    "empty_scan": lambda f: (
        f"The scan has no voxel brighter than 0: it does not look like an MRI. {NOTHING} Check the input volume.", ()),
    "binary_image": lambda f: (
        f"The input volume holds two values only: it is a mask or a binary image, not an MRI. {NOTHING} Choose the "
        "scan itself as the input; a brain mask goes under Advanced > Brain mask.", (SHOW_ADVANCED,)),
    "needs_deepbet": lambda f: (
        "This scan still has its skull, and removing it needs the Python package deepbet, which is not installed. "
        f"{NOTHING} Press Segment again and confirm its installation; or, if the skull is already removed, set "
        "Advanced > Brain extraction to off.", (SHOW_ADVANCED,)),
    "deepbet_damaged": lambda f: (
        f"The brain-extraction package deepbet is damaged or not version {f.get('version', '?')}. {NOTHING} "
        f"In Slicer's Python console run slicer.util.pip_install(\"deepbet=={f.get('version', '1.0.2')}\"), restart "
        "Slicer and try again; or, if the skull is already removed, set Advanced > Brain extraction to off.",
        (SHOW_ADVANCED,)),
    "two_objects": lambda f: (
        f"The scan seems to hold two heads or a large second object ({f.get('ml', '?')} mL beside "
        f"{f.get('first_ml', '?')} mL). {NOTHING} Crop the volume to one head (Crop Volume module), or {BRAIN_MASK}.",
        (SHOW_ADVANCED,)),
    "no_brain_found": lambda f: (
        f"Brain extraction found no brain in this scan ({f.get('ml', 0)} mL; a brain has 1100-2000 mL). {NOTHING} "
        "Is it a T1-weighted MRI of a head? If the skull is already removed, set Advanced > Brain extraction to off; "
        f"otherwise {BRAIN_MASK}.", (SHOW_ADVANCED,)),
    "too_much_brain": lambda f: (
        f"Brain extraction found {f.get('ml', '?')} mL of brain-like tissue, more than one brain (at most "
        f"{f.get('max_ml', '?')} mL): two heads in view, or not a T1-weighted MRI? {NOTHING} Crop the volume to one "
        f"head (Crop Volume module), or {BRAIN_MASK}.", (SHOW_ADVANCED,)),
    "looks_like_ct": lambda f: (
        f"This looks like a CT ({f.get('percent_air', '?')} % of its voxels have the density of air), not an MRI. "
        f"{NOTHING} MetaSeg segments T1-weighted MRI.", ()),
    "device_unavailable": lambda f: (
        f"The device '{f.get('device', '?')}' is not available on this computer. {NOTHING} Set Device to auto "
        "(the GPU when there is one, else the CPU) or cpu.", ()),
    "unexpected": lambda f: (
        "MetaSeg stopped with an internal error; nothing was added to the scene. Please report it with the details "
        "below (they say what happened, for the developers).", ()),
}


def explain(failure: Mapping[str, Any], what: str = "segment this volume") -> Failure:
    """The panel's wording of a failed run. `failure`: the core's error event (message, reason, facts,
    traceback) or, for a process that ended without one, {"message", "crash": True, "details": stderr tail}.
    `what`: what could not be done, for messages without a reason ("render the cross-section")."""
    message = str(failure.get("message") or "")
    reason = failure.get("reason")
    details = _details(message, failure)
    wording = WORDING.get(reason) if isinstance(reason, str) else None
    if wording is not None:
        text, actions = wording(failure.get("facts") or {})
        return Failure(text, details, actions, reason)
    if failure.get("crash"):
        return Failure("The MetaSeg process ended unexpectedly; nothing was added to the scene. If the computer ran "
                       "out of memory, close other programs or use a smaller volume, and try again.",
                       details, (), None)
    if not message or CLI_OPTION.search(message):
        return Failure(f"MetaSeg could not {what}; nothing was added to the scene. The details say why.",
                       details, (), reason if isinstance(reason, str) else None)
    return Failure(f"MetaSeg could not {what}: {_sentence(message)}", details, (),
                   reason if isinstance(reason, str) else None)


def local(text: str, details: str = "") -> Failure:
    """A failure of the module's own work (not the core's): shown as it is."""
    return Failure(text, details)


def _details(message: str, failure: Mapping[str, Any]) -> str:
    parts = [message] if message else []
    for key in ("traceback", "details"):
        extra = failure.get(key)
        if extra and str(extra).strip() and str(extra).strip() not in message:
            parts.append(str(extra).rstrip())
    return "\n\n".join(parts)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."
