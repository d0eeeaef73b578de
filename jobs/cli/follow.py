"""Following a run from its run folder: a live bar on a terminal, plain periodic lines in a log or CI.

Everything shown is read from the run folder (metrics.jsonl, events.jsonl, run.json), so following looks the
same whatever target runs the job.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunerun.cluster.run_folder import EvalRow, JsonlTail, RunFolder, TrainRow, events, metric_rows
from tunerun.jobs.metrics import PREFERENCE, SCORES

PLAIN_EVERY_S = 10.0


class RunFollower:
    def __init__(self, run: RunFolder, console: Console, from_start: bool = True):
        self.run, self.console, self.tail = run, console, JsonlTail()
        self.metrics_seen = self.events_seen = 0
        if not from_start:  # a resumed run: show only what happens from now on
            self.events_seen = len(events(run, self.tail))
            self.metrics_seen = len(metric_rows(run, self.tail).ordered)
        self.last: TrainRow | None = None
        self.first_train: TrainRow | None = None
        self.first_eval: float | None = None
        self.last_eval: float | None = None
        self._last_plain = 0.0
        self._last_plain_step = -1

    def follow(self, is_done: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Show progress until ``is_done()``, then everything the run recorded up to that moment."""
        live = self.console.is_terminal
        with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=self.console, disable=not live, transient=False) as bar:
            task = bar.add_task("train", total=None, info="waiting for workers")
            while True:
                done = is_done()
                self._drain(bar, task, live)
                if done:
                    break
                time.sleep(poll_s)

    def _drain(self, bar: Progress, task, live: bool) -> None:
        seen_events, rows = events(self.run, self.tail), metric_rows(self.run, self.tail).ordered
        fresh = [(e["time"], 0, e) for e in seen_events[self.events_seen:]]
        fresh += [(m.time, 1, m) for m in rows[self.metrics_seen:]]
        self.events_seen, self.metrics_seen = len(seen_events), len(rows)
        for _, is_metric, record in sorted(fresh, key=lambda item: item[:2]):
            self._take_metrics(record) if is_metric else self._show_event(record)
        if self.last is not None:
            total = self.last.total_steps
            bar.update(task, total=total, completed=self.last.step, info=self._train_info())
            fresh = self.last.step != self._last_plain_step
            if not live and fresh and time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
                self._last_plain, self._last_plain_step = time.monotonic(), self.last.step
                self.console.print(f"train  step {self.last.step}/{total}  {self._train_info()}")

    def _take_metrics(self, row: TrainRow | EvalRow) -> None:
        if isinstance(row, TrainRow):
            self.first_train = self.first_train or row
            self.last = row
            return
        held_out = row.held_out
        if "loss" not in held_out:
            return  # only the forgetting check ran at this step
        if self.first_eval is None:
            self.first_eval = held_out["loss"]
        self.last_eval = held_out["loss"]
        # what the objective measures (perplexity, or preference pairs' reward accuracy), then the scores
        shown = [name for name in ("perplexity", *PREFERENCE, *SCORES) if name in held_out]
        label = "base" if row.base else f"step {row.step}"
        self.console.print(f"eval   {label}  loss {held_out['loss']:.4f}"
                           + "".join(f"  {name} {held_out[name]:.2f}" for name in shown))

    def _train_info(self) -> str:
        info = f"loss {self.last.loss:.4f}  lr {self.last.lr or 0:.2e}  {self.last.tokens_per_s or 0:,.0f} tok/s"
        return info + (f"  eta {self._eta()}" if not self.console.is_terminal else "")

    def _eta(self) -> str:
        """From the pace since this follower first saw a step (a resumed run's earlier steps don't count)."""
        first = self.first_train or self.last
        steps_done = self.last.step - first.step
        if steps_done <= 0 or self.last.elapsed_s is None or first.elapsed_s is None:
            return "?"
        pace = (self.last.elapsed_s - first.elapsed_s) / steps_done
        if pace < 0:  # the worker group restarted and its clock with it
            return "?"
        left = int(pace * ((self.last.total_steps or self.last.step) - self.last.step))
        return f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"

    def _show_event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "data_prepared":
            self.console.print(f"data   {event['records_read']:,} records → {event['train_records']:,} train, "
                               f"{event['eval_records']:,} eval")
        elif kind == "training_started":
            self.console.print(f"train  {event['total_steps']} steps on {event['world_size']} workers"
                               + (f", resuming at step {event['start_step']}" if event["start_step"] else ""))
        elif kind == "checkpoint_saved":
            self.console.print(f"ckpt   step {event['step']}  ✓ {event['files']} files, sha256 manifest written")
        elif kind == "reference_ready":  # DPO under a full fine-tune: one forward over every pair before step 1
            self.console.print(f"ref    reference log-probabilities of {event['pairs']:,} pairs {event['source']} "
                               f"({event['seconds']:.1f} s)")
        elif kind in ("checkpoint_skipped", "resumed"):
            self.console.print(f"ckpt   {kind.replace('_', ' ')}: {event.get('detail') or event.get('checkpoint')}")

