"""batchpilot.plan — see ../shared/DESIGN.md."""
