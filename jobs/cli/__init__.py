"""The `tunerun` command line: one module per group of commands, gathered into one click group here.

- `spec`: validate, plan — a job spec checked and sized before anything runs.
- `runs`: run, submit, render, list, status, logs, cancel — a run's lifecycle on its target (`follow`: the live view).
- `results`: eval, export, report — what a run produced, judged and handed over.
- `data`: data prepare, data inspect — the data a job trains on.
- `serve`: the fine-tuning service (OpenAI's API, `tunerun.jobs.service`) and its API keys.
- `options`: what they all share (consoles, exit codes, the options written once, loading a spec, the run store).

Exit codes: 0 success, 2 a user error (one message, no traceback), 1 an internal failure (the traceback goes to
a log file, its path is printed). Importing this package loads neither torch nor Ray.
"""
from __future__ import annotations

import click

from tunerun.jobs.cli import data, results, runs, serve, spec
from tunerun.jobs.plan import TUNERUN_VERSION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(TUNERUN_VERSION, prog_name="tunerun")
def main():
    """Fine-tune open language models on your own data and hardware."""


for _module in (spec, runs, results, data, serve):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]
