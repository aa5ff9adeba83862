"""Human-readable text of a run report (the core's `--report` JSON)."""
from __future__ import annotations

from typing import Any, Dict, List


def tissue_rows(report: Dict[str, Any]) -> List[str]:
    rows = []
    for c in report.get("classes", []):
        if c.get("value") == 0:
            continue
        if "volume_ml" in c:
            size = f"{c['volume_ml']:.2f} mL"
            fits = c.get("volume_ml_fits")
            if fits:  # several fits: the range this volume took between them says what it is worth
                size += f" (fits {min(fits):.2f}–{max(fits):.2f})"
        elif "area_mm2" in c:
            size = f"{c['area_mm2']:.0f} mm²"
        else:
            size = ""
        rows.append(f"{c.get('name', c.get('value'))}: {size} ({c.get('voxels', 0)} voxels)")
    return rows


def device_text(report: Dict[str, Any]) -> str:
    """'cuda (torch 2.3.1+cu121)' from the report."""
    torch_version = report.get("versions", {}).get("torch", "?")
    return f"{report.get('device', '?')} (torch {torch_version})"


def format_report(report: Dict[str, Any], weights: bool = False) -> str:
    """Tissue sizes (with several fits, the range they took between the fits), warnings, device and timing of one run, as plain text; with `weights`, also the weights file
    and its checksum (the panel puts those in the report's tooltip, not in its text)."""
    lines = tissue_rows(report)
    fit = report.get("fit", {})
    timings = report.get("timings_s", {})
    lines.append("")
    details = []
    if "steps" in fit:
        details.append(f"{fit['steps']} fit steps")
    if "psnr_db" in fit:
        details.append(f"PSNR {fit['psnr_db']} dB")
    if "total" in timings:
        details.append(f"{timings['total']:.1f} s")
    details.append(f"on {device_text(report)}")
    lines.append(", ".join(details))
    if weights and report.get("weights_sha256"):
        lines.append(f"weights {report.get('weights', '')} (sha256 {report['weights_sha256'][:12]}…)")
    for w in report.get("warnings", []):
        lines.append(f"Warning: {w}")
    return "\n".join(lines).strip()
