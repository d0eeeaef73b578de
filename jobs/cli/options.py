"""What every `tunerun` command shares: the consoles, the error handling (exit 2 / exit 1), the arguments and
options written once (JOB with ``--set`` / ``--storage``, RUN and its ``--storage``, ``--run-id``, ``--checkpoint``,
``--json``), loading a job spec and opening the runs under a storage location.

The command modules import this one; nothing here imports them or the package that gathers them into the group.
Importing it loads neither torch nor Ray.
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback

import click
from rich.console import Console
from rich.markup import escape

from tunerun.cluster import targets
from tunerun.cluster.space import describe_disk_full, is_disk_full
from tunerun.jobs.errors import TunerunError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import ResolvedJob, resolve

# Piped output (logs, CI, scripts) gets long lines instead of rich's default 80-column wrapping.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
DEFAULT_STORAGE = os.environ.get("TUNERUN_STORAGE", "./runs")


def user_errors(command):
    """Turn TunerunError (and a full disk) into one message + exit 2, anything else into a logged traceback + exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TunerunError as exc:
            err_console.print(f"[red]error[/red] {exc}", soft_wrap=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the user sees one line, the details go to a file
            if is_disk_full(exc):
                message = f"disk full: {describe_disk_full(exc, os.getcwd())}; free space there and run it again"
                note_in_cli_log(message)
                err_console.print(f"[red]error[/red] {escape(message)}", soft_wrap=True)
                sys.exit(2)
            fd, path = tempfile.mkstemp(prefix="tunerun-error-", suffix=".log")
            with os.fdopen(fd, "w") as handle:
                traceback.print_exc(file=handle)
            err_console.print(f"[red]internal error[/red] {sys.exc_info()[1]!r}; details in {path}")
            sys.exit(1)

    return wrapper


def note_in_cli_log(text: str) -> None:
    """Append a line to the CLI's own log (``$TUNERUN_CACHE/tunerun.log``, default ``~/.cache/tunerun``): what a
    user was told about a run whose folder could not keep it (a full disk). Best effort."""
    from tunerun.cluster.storage import cache_root

    cache = cache_root()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / "tunerun.log").open("a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
    except OSError:
        pass


def job_options(command):
    """JOB, ``--set KEY=VALUE`` (repeatable) and ``--storage URI``: what every command that reads a spec takes."""
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a spec field, e.g. --set training.max_steps=20 (value parsed as YAML)."
                           )(command)
    command = click.option("--storage", default=None, metavar="URI",
                           help="Storage URI for the run folder (overrides storage.uri).")(command)
    return click.argument("job_file", type=click.Path(dir_okay=False))(command)


# RUN: the run id of the commands that read an existing run.
run_argument = click.argument("run_id")

# --storage of the commands that read existing runs (list, status, logs, cancel, eval, export, report).
storage_option = click.option("--storage", default=None, metavar="URI",
                              help="Storage URI holding the runs (default: $TUNERUN_STORAGE, else ./runs).")

run_id_option = click.option("--run-id", default=None, help="Run id (default: name + UTC timestamp).")

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


class CheckpointParam(click.ParamType):
    """``--checkpoint``: a step number, or ``best`` (the complete checkpoint with the best checkpoint.best_metric)."""

    name = "STEP|best"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "best":
            return value
        if str(value).isdigit():
            return int(value)
        self.fail(f"{value!r} is neither a step number nor 'best'", param, ctx)


checkpoint_option = click.option(
    "--checkpoint", type=CheckpointParam(), default=None,
    help="The checkpoint of this step, or 'best' by checkpoint.best_metric (default: the final weights, else the "
         "newest checkpoint).")


def load_resolved(job_file: str, overrides: tuple[str, ...], storage: str | None,
                  run_id: str | None = None) -> ResolvedJob:
    """The job spec in ``job_file`` with ``--set`` overrides and ``--storage``, every default resolved."""
    extra = [f"storage.uri={storage}"] if storage else []
    spec = load_job(job_file, [*overrides, *extra], model=targets.job_model())
    return resolve(spec, run_id=run_id, source=job_file)


def run_store(storage: str | None):
    """Runs under --storage; an S3 endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, as in the AWS CLI."""
    from tunerun.cluster.run_folder import RunStore
    from tunerun.jobs.spec import StorageSpec

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return RunStore(StorageSpec(uri=storage or DEFAULT_STORAGE, endpoint_url=endpoint))


def open_run(run_id: str, storage: str | None):
    """The run folder of ``run_id`` under --storage."""
    return run_store(storage).open(run_id)
