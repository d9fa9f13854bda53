"""Developer tools of the repository, not part of the installed ``peft_fast`` package.

Run from the repository root with ``python -m`` (e.g. ``python -m tools.hopper.report``).
"""
