"""Results: versioned JSON, Markdown + HTML reports with plots, written atomically."""

from alignscope.report.document import Report
from alignscope.report.output import OutputDir, environment, write_json_atomic

__all__ = ["OutputDir", "Report", "environment", "write_json_atomic"]
