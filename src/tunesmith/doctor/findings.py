"""A doctor finding, and doctor.json: the findings of a run, written whole or not at all."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

DOCTOR_FILE = "doctor.json"


@dataclass
class Finding:
    """One diagnosis in the guide's terms: what was seen (`message`), why it happens (`cause`), what to change
    (`remedy`). `fatal` findings stop training; `step` is where the problem began, when it has one."""

    code: str
    message: str
    remedy: str
    cause: str = ""
    fatal: bool = False
    step: int | None = None
    example_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """The finding as a user reads it: one paragraph, most important first."""
        head = f"[{'fatal' if self.fatal else 'warning'}] {self.message}"
        parts = [head] + ([f"cause: {self.cause}"] if self.cause else []) + [f"remedy: {self.remedy}"]
        if self.example_ids:
            parts.append(f"examples: {', '.join(self.example_ids)}")
        return "\n  ".join(parts)


def read_findings(run: Path) -> list[Finding]:
    path = Path(run) / DOCTOR_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("findings", [])
    except (ValueError, AttributeError):
        return []
    return [Finding(**r) for r in rows]


def merge_findings(old: list[Finding], new: list[Finding]) -> list[Finding]:
    """One finding per code: a newer diagnosis of the same problem replaces the older one."""
    by_code = {f.code: f for f in old}
    by_code.update({f.code: f for f in new})
    return list(by_code.values())


def write_findings(run: Path, findings: list[Finding]) -> None:
    """doctor.json, through a temporary sibling and a rename (a kill never leaves it torn)."""
    path = Path(run) / DOCTOR_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"findings": [f.as_dict() for f in findings]}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
