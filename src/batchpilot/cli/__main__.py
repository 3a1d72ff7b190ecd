"""``python -m batchpilot.cli …`` (what ``torchrun … -m batchpilot.cli train …`` runs on every rank)."""

import os

from batchpilot.cli import app
from batchpilot.cli._common import run_app

code = run_app(app)
if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
    from batchpilot.train.distributed import exit_skipping_teardown

    exit_skipping_teardown(code)  # a torchrun rank (see exit_skipping_teardown)
raise SystemExit(code)
