"""The command line, and the promises README.md makes about set-up and CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from peft_fast.cli import main, nf4_self_check

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_versions_backend_and_self_check(capsys):
    assert main(["info", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^peft-fast \d+\.\d+\.\d+", out, re.M)
    assert re.search(r"^backend: (cuda|triton-interpreter|torch-cpu)$", out, re.M)
    assert re.search(r"^device: ", out, re.M)
    assert "NF4 round trip" in out and ": ok" in out


def test_self_check_measures_real_error():
    check = nf4_self_check("cpu", seconds=0.05)
    assert check["rounds"] >= 1 and check["idempotent"]
    assert 0.05 < check["max_relative_error"] < 0.15


def test_info_runs_as_console_command():
    result = subprocess.run(
        [sys.executable, "-m", "peft_fast.cli", "info", "--seconds", "0.1"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "NF4 round trip" in result.stdout


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- (?:main|test)-command -->\n```bash\n(.+?)\n```", text, re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = commands[1]
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    assert test_command in ci, "the test command in .ci/run must be exactly README's"
