"""``batchpilot tune`` rejects bad input before any stage runs: one line on stderr, exit 2."""

from __future__ import annotations

from pathlib import Path

from batchpilot.cli import app


def test_bad_input_is_one_line(cli_runner, tmp_path: Path) -> None:
    for args, text in ((["--skip", "bogus"], "unknown stage"), (["--gpu", "h100-sxm"], "--gpus"),
                       (["--time-budget", "abc"], "--time-budget"), (["--memory-budget", "-1GiB"], "--memory-budget")):
        result = cli_runner.invoke(app, ["tune", "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1
