"""Entry point of one torchrun worker: ``python -m batchpilot.train.worker CONFIG.json``.

A user error becomes one line on stderr, in ``OUT/error.txt`` (rank 0) for the launching process to
report, and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from batchpilot.errors import BatchpilotError
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import die_with_parent, exit_skipping_teardown
from batchpilot.train.runner import ERROR_FILE, run


def main(argv: list[str]) -> int:
    die_with_parent()  # torchrun put this rank in its own session: go when torchrun goes
    config = TrainConfig.from_dict(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    try:
        run(config)
    except BatchpilotError as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"error: {message}\n")
        if os.environ.get("RANK", "0") == "0":
            out = Path(config.run.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / ERROR_FILE).write_text(message + "\n", encoding="utf-8")
        return 2
    return 0


if __name__ == "__main__":
    exit_skipping_teardown(main(sys.argv[1:]))
