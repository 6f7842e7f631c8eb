"""The artifacts stade writes and reads: names and kinds."""

from __future__ import annotations

REPORT_FILE = "stade.json"
REPORT_KIND = "stade-prune-report"
