"""batchpilot.measure — see ../shared/DESIGN.md."""
