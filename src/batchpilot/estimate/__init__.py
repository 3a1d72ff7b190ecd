"""batchpilot.estimate — see ../shared/DESIGN.md."""
