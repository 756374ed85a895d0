"""What one datagen step did: rows in and out, each drop reason counted, teacher traffic, time."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .rows import atomic_write_text


@dataclass
class StepReport:
    step: str
    out: str
    rows_in: int = 0
    rows_out: int = 0
    resumed: int = 0  # rows already in the output from an earlier run, kept and counted in rows_out
    dropped: Counter = field(default_factory=Counter)
    teacher: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count

    def finish(self, teacher=None) -> "StepReport":
        self.seconds = round(time.perf_counter() - self.started, 3)
        if teacher is not None:
            self.teacher = teacher.usage.as_dict() | {"teacher": teacher.name}
        return self

    def as_dict(self) -> dict:
        return {
            "step": self.step, "out": self.out, "rows_in": self.rows_in, "rows_out": self.rows_out,
            "resumed": self.resumed, "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()), "teacher": self.teacher, "seconds": self.seconds,
            **self.extra,
        }

    def lines(self) -> list[str]:
        out = [f"{self.step}: {self.rows_in} rows in, {self.rows_out} out"
               + (f" ({self.resumed} from an earlier run)" if self.resumed else "") + f" -> {self.out}"]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            out.append(f"  dropped {count:>6}  {reason}")
        if self.teacher:
            t = self.teacher
            out.append(f"  teacher {t['teacher']}: {t['requests']} requests ({t['retries']} retries, {t['failed']} failed), "
                       f"{t['prompt_tokens']} prompt + {t['completion_tokens']} completion tokens")
        out.append(f"  time {self.seconds:.1f} s")
        return out

    def write(self) -> Path:
        path = report_path(self.out)
        atomic_write_text(path, json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n")
        return path


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".report.json")
