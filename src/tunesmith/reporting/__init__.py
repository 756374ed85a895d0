"""`tunesmith report RUN`: one self-contained HTML file (RUN/report.html) with the run's curves, data, answers,
forgetting report, config and doctor findings."""
from .build import REPORT_FILE, build_report, write_report

__all__ = ["REPORT_FILE", "build_report", "write_report"]
