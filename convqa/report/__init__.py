"""Qualification reports: evidence JSON, Markdown, self-contained HTML with plots, JUnit XML.

qualification.json is the single source; the other outputs are rendered from it.
"""

from convqa.report.build import render_reports, write_report
from convqa.report.summary import write_summary

__all__ = ["render_reports", "write_report", "write_summary"]
