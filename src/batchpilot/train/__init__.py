"""batchpilot.train — see ../shared/DESIGN.md."""
