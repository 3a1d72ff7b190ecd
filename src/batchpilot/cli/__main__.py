"""``python -m batchpilot.cli …`` (what ``torchrun … -m batchpilot.cli train …`` runs on every rank)."""

from batchpilot.cli import main

main()
