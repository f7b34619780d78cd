"""`strop report`: plots and one self-contained HTML page for one run or several side by side."""

from strop.report.html import write_report

__all__ = ["write_report"]
