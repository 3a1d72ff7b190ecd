"""batchpilot.report — see ../shared/DESIGN.md."""
