"""Exact and near-duplicate removal: a hash of the normalised text finds exact copies; MinHash LSH (datasketch)
over word shingles finds candidate near copies, and the exact Jaccard similarity of the two shingle sets decides.
MinHash only estimates Jaccard (about +-0.04 at 128 permutations), so deciding by the estimate would drop some
rows below the threshold and keep some above it; the LSH is queried at a lower threshold (CANDIDATE_MARGIN)
so that it misses few true pairs, and the exact check removes the extra candidates. The first row of each
cluster is kept; the report lists every cluster as kept id -> dropped ids."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from ..errors import TunesmithError
from .report import StepReport
from .rows import FIELDS, check_output_path, passed_step, read_rows, write_rows
from .step import ROW_COLUMNS, StepInfo

INFO = StepInfo("dedup", inputs=("instruction",), outputs=ROW_COLUMNS)
WORDS = re.compile(r"\w+")
CANDIDATE_MARGIN = 0.1  # the LSH looks for candidates this far below the threshold


@dataclass
class DedupOptions:
    threshold: float = 0.8  # Jaccard similarity of shingle sets above which two rows are near duplicates
    shingle: int = 3  # words per shingle
    num_perm: int = 128
    fields: tuple[str, ...] = FIELDS

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise TunesmithError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.shingle < 1:
            raise TunesmithError(f"--shingle must be at least 1 word, got {self.shingle}")


def normalised(row: dict, fields: tuple[str, ...]) -> list[str]:
    """Lower-case words of the row's fields, punctuation and spacing dropped; a field break stays a word."""
    words: list[str] = []
    for key in fields:
        words += WORDS.findall(str(row.get(key) or "").lower()) + ["\x00"]
    return words


def shingles(words: list[str], size: int) -> set[bytes]:
    if len(words) <= size:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def dedup_rows(rows: list[dict], options: DedupOptions, report: StepReport) -> list[dict]:
    lsh = MinHashLSH(threshold=max(options.threshold - CANDIDATE_MARGIN, 0.05), num_perm=options.num_perm)
    exact: dict[str, str] = {}
    kept_shingles: dict[str, set[bytes]] = {}
    clusters: dict[str, list[str]] = {}
    kept = []
    for row in rows:
        words = normalised(row, options.fields)
        key = hashlib.sha1(" ".join(words).encode("utf-8")).hexdigest()
        if key in exact:
            report.drop("exact duplicate (normalised text)")
            clusters.setdefault(exact[key], []).append(row["id"])
            continue
        row_shingles = shingles(words, options.shingle)
        sketch = MinHash(num_perm=options.num_perm, seed=1)
        sketch.update_batch(list(row_shingles))
        near = [k for k in lsh.query(sketch) if jaccard(kept_shingles[k], row_shingles) >= options.threshold]
        if near:
            report.drop(f"near duplicate (Jaccard >= {options.threshold})")
            clusters.setdefault(min(near, key=_order(kept)), []).append(row["id"])
            continue
        exact[key] = row["id"]
        kept_shingles[row["id"]] = row_shingles
        lsh.insert(row["id"], sketch)
        kept.append(row)
    report.extra["clusters"] = len(clusters)
    report.extra["cluster_members"] = clusters
    return kept


def _order(kept: list[dict]):
    index = {r["id"]: i for i, r in enumerate(kept)}
    return index.__getitem__


def dedup(path: str | Path, out: str | Path, options: DedupOptions | None = None) -> StepReport:
    options = options or DedupOptions()
    options.check()
    rows = read_rows(path, need_output=INFO.needs_output)
    out = check_output_path(out, [path])
    report = StepReport(INFO.name, str(out), rows_in=len(rows))
    kept = dedup_rows(rows, options, report)
    clusters = report.extra["cluster_members"]
    write_rows(out, [passed_step(r, INFO.name, "exact+minhash", duplicates=clusters.get(r["id"], [])) for r in kept])
    report.rows_out = len(kept)
    return report.finish()
