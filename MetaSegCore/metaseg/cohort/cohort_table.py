"""The cohort's volumes table (`volumes.tsv`): one row per scan, written atomically, merged across shards.

Columns: index (position in the cohort), id, input, status (ok, failed, pending = not run yet), error;
each tissue class's volume in mL (`<class>_ml`; 2D slices: areas, `<class>_mm2`) and their sum
(`brain_ml`: the labelled brain tissue); QC: registration NCC in the brain and its interior (3D scans
in scanner geometry), fit PSNR; warnings, seconds, device, weights sha256, metaseg version.
Plain tab-separated text with a header: `pandas.read_csv(p, sep="\\t")`, R `read.delim(p)`. A text cell that a
spreadsheet would run as a formula (an id `=1+1`) starts with an apostrophe (spreadsheet.py); `read_table` removes it.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..io.atomic import write_all
from .cohort import Scan
from ..io.readers import InputError
from ..io.spreadsheet import quote, unquote

TABLE_NAME = "volumes.tsv"
LEAD = ["index", "id", "input", "status", "error"]
TAIL = ["registration_ncc", "registration_ncc_interior", "psnr_db", "warnings", "seconds", "device",
        "weights_sha256", "metaseg_version"]
STATUSES = ("ok", "failed", "pending")
TIMING_COLUMNS = ("seconds",)  # differ between runs of the same scans
_SHARD_TABLE = re.compile(r"^volumes\.shard-(\d+)-of-(\d+)\.tsv$")

Row = Dict[str, Any]


def table_name(shard: Optional[Tuple[int, int]]) -> str:
    """`volumes.tsv`, or `volumes.shard-I-of-N.tsv` for shard I of N (shards may share one folder)."""
    return TABLE_NAME if shard is None else f"volumes.shard-{shard[0]}-of-{shard[1]}.tsv"


def ok_row(scan: Scan, report: Dict[str, Any]) -> Row:
    """A segmented scan's row, from its report."""
    row: Row = {"index": scan.index, "id": scan.id, "input": str(scan.path), "status": "ok", "error": ""}
    total, unit = 0.0, "ml"
    for c in report["classes"]:
        if c["value"] == 0:
            continue
        value, unit = (c["volume_ml"], "ml") if "volume_ml" in c else (c["area_mm2"], "mm2")
        row[f"{_slug(c['name'])}_{unit}"] = value
        if "spread_pct" in c:  # several fits: how far this volume moved between them
            row[f"{_slug(c['name'])}_spread_pct"] = c["spread_pct"]
        total += value
    row[f"brain_{unit}"] = round(total, 3)
    for t in report.get("tissues", []):  # a structures run: the tissues they make up, beside them
        row[f"tissue_{_slug(t['name'])}_{unit}"] = t.get("volume_ml", t.get("area_mm2"))
    reg = report.get("registration") or {}
    return {**row, "registration_ncc": _rounded(reg.get("ncc")), "registration_ncc_interior": _rounded(reg.get("ncc_interior")),
            "psnr_db": report["fit"]["psnr_db"], "warnings": " | ".join(report["warnings"]),
            "seconds": report["timings_s"]["total"], "device": report["device"],
            "weights_sha256": report["weights_sha256"], "metaseg_version": report["versions"]["metaseg"]}


def failed_row(scan: Scan, error: str, seconds: float, version: str) -> Row:
    return {"index": scan.index, "id": scan.id, "input": str(scan.path), "status": "failed", "error": error,
            "seconds": round(seconds, 3), "metaseg_version": version}


def pending_row(scan: Scan) -> Row:
    return {"index": scan.index, "id": scan.id, "input": str(scan.path), "status": "pending"}


def columns(rows: Iterable[Row]) -> List[str]:
    """LEAD, the size columns present (in order of first appearance), TAIL."""
    sizes: Dict[str, None] = {}
    for r in rows:
        sizes.update((k, None) for k in r if k not in LEAD and k not in TAIL)
    return LEAD + list(sizes) + TAIL


def write_table(path: Path, rows: Iterable[Row]) -> None:
    """Write the rows, sorted by index, atomically: readers see the old table or the new one, never half."""
    rows = sorted(rows, key=lambda r: int(r["index"]))
    header = columns(rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(header)
            for r in rows:
                w.writerow([_cell(r.get(c, "")) for c in header])

    write_all([(Path(path), write)])


def read_table(path: Path) -> List[Row]:
    """The rows of a table `write_table` wrote, with their cells as they were before `spreadsheet.quote`."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: unquote(v) if isinstance(v, str) else v for k, v in r.items()}
                for r in csv.DictReader(f, delimiter="\t")]


def merge_shards(folder: Path, force: bool = False) -> Tuple[Path, List[Row]]:
    """Join `volumes.shard-I-of-N.tsv` of all N shards in `folder` into `volumes.tsv`; (path, rows).

    Refuses (InputError, nothing written) when shards are missing, disagree on N, do not add up to one
    cohort (an index twice or absent: signs of shards made from different inputs), or a table is malformed;
    an existing `volumes.tsv` is replaced only with `force`.
    """
    out = Path(folder) / TABLE_NAME
    if out.exists() and not force:
        raise InputError(f"{out} exists (an earlier merge or an unsharded batch); pass --force to replace it with the "
                         "merged shards")
    found: Dict[int, Path] = {}
    counts = set()
    for p in sorted(Path(folder).glob("volumes.shard-*-of-*.tsv")):
        m = _SHARD_TABLE.match(p.name)
        if m:
            found[int(m.group(1))] = p
            counts.add(int(m.group(2)))
    if not found:
        raise InputError(f"no shard tables (volumes.shard-I-of-N.tsv) in {folder}: run `metaseg batch --shard I/N` first")
    if len(counts) > 1:
        raise InputError(f"the shard tables in {folder} come from different shard counts ({sorted(counts)}); "
                         "remove the stale ones")
    n = counts.pop()
    missing = [i for i in range(1, n + 1) if i not in found]
    if missing:
        raise InputError(f"shard(s) {', '.join(map(str, missing))} of {n} have no table in {folder}: run them, then merge")
    rows = [r for i in sorted(found) for r in checked_table(found[i])]
    indexes = sorted(int(r["index"]) for r in rows)
    if indexes != list(range(len(rows))):
        raise InputError(f"the shard tables in {folder} do not make one cohort (row indexes repeat or are missing): "
                         "were the shards run on different inputs?")
    write_table(out, rows)
    return out, sorted(rows, key=lambda r: int(r["index"]))


def checked_table(path: Path) -> List[Row]:
    """The rows of a shard table, refused (InputError naming the file and line) unless every row has the lead
    columns, an integer index and a known status: an edited or cut-off table must not become a cohort's."""
    try:
        rows = read_table(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the shard table {path} ({e}); rerun that shard") from e
    for k, r in enumerate(rows, start=2):
        missing = [c for c in ("index", "id", "status") if not r.get(c)]
        if missing or not str(r["index"]).isdigit() or r["status"] not in STATUSES or None in r:
            what = (f"no {', '.join(missing)}" if missing else f"index {r['index']!r}" if not str(r["index"]).isdigit()
                    else f"status {r['status']!r}" if r["status"] not in STATUSES else "more cells than columns")
            raise InputError(f"the shard table {path} is malformed (line {k}: {what}); rerun that shard to rewrite it, "
                             "then merge")
    return rows


def merge_warnings(rows: Sequence[Row]) -> List[str]:
    """Finished scans made by different metaseg versions or weights: one table, results not comparable."""
    out = []
    for column, what in (("metaseg_version", "metaseg versions"), ("weights_sha256", "weights")):
        seen = sorted({r.get(column) for r in rows if r.get("status") == "ok" and r.get(column)})
        if len(seen) > 1:
            out.append(f"the merged scans were segmented with different {what} ({', '.join(s[:12] for s in seen)}): "
                       "their volumes are not comparable; rerun the odd shards with one version and one weights file")
    return out


class TableLock:
    """This process's exclusive hold on a table (`lock_table`); `close()` (or leaving a `with` block) removes the
    lock file and releases it. The file is removed while still locked, and a run that locked a file which was
    meanwhile removed tries again, so that two runs never hold locks on two different files of one name."""

    def __init__(self, path: Path, file: IO[str]):
        self.path, self.file = path, file

    def close(self) -> None:
        if self.file.closed:
            return
        try:
            if _same_file(self.file, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # already gone, or a read-only folder: the lock still ends with the file's closing
        self.file.close()

    def __enter__(self) -> "TableLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock_table(path: Path) -> TableLock:
    """Make this process the only batch writing the table `path` until the returned lock is closed: two runs on one
    folder would each fail on the other's finished scans and leave a table that says they all failed. The lock
    (`.<table>.lock` beside it, advisory) ends when it is closed (its file removed) or the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    while True:
        f = open(lock, "a+", encoding="utf-8")
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no guard
            return TableLock(lock, f)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            raise InputError(f"another metaseg batch is writing {path} right now; wait for it to finish (then rerun to "
                             "continue), or use another output folder (--shard runs write separate tables)") from e
        if _same_file(f, lock):
            return TableLock(lock, f)
        f.close()  # the run before us removed this file after we opened it: lock the one there now


def _same_file(f: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        return False


def _slug(name: str) -> str:
    """`Cortical gray matter` -> `cortical_gray_matter`."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _rounded(v: Optional[float]) -> Any:
    return "" if v is None else round(float(v), 4)


def _cell(v: Any) -> str:
    """One line per row, tabs only between cells (TSV readers need no quoting rules), and no cell that a
    spreadsheet would run as a formula (`spreadsheet.quote`)."""
    return quote(re.sub(r"[\t\r\n]+", " ", str(v)))


def status_counts(rows: Sequence[Row]) -> Dict[str, int]:
    out = {"ok": 0, "failed": 0, "pending": 0}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out
