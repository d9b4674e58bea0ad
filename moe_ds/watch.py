"""The checkpoint watcher: evaluate every checkpoint of a run as soon as its completion marker lands.

Order of work: the baseline once per run (``RUN_DIR/baseline_eval``, kept across restarts), then every
complete checkpoint not yet evaluated (catch-up), then checkpoints announced by watchdog events on their
``CHECKPOINT_COMPLETE`` marker (directory creation alone means nothing: the distillation stage writes the
marker last). Events are debounced; a periodic rescan catches events a filesystem lost. One evaluation runs
at a time, under a per-checkpoint file lock so two evaluators never duplicate work; SIGINT/SIGTERM stop the
loop between evaluations (a second signal interrupts the current one). Results that no longer describe their
checkpoint (``moe_ds.evaluate.stale_reason``: the folder was rebuilt, or an error was recorded before the
marker) are evaluated again without ``--retry-failed``.
"""

import signal
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from moe_ds.dist import logger
from moe_ds.evaluate import (BASELINE_DIR, RESOLVED_CONFIG, EvalConfig, TaskResolver, WandbLog, evaluate_into,
                             flat_metrics, is_evaluated, read_results, results_dir, stale_reason, write_summary)
from moe_ds.run_layout import (CHECKPOINT_COMPLETE, check_output_dir, checkpoint_step, complete_checkpoints,
                               is_complete_checkpoint, remove_stale_temporaries, write_json_atomic)

LOCK_NAME = ".eval.lock"  # inside the results folder


class MarkerHandler(FileSystemEventHandler):
    """Calls ``notify(checkpoint_dir)`` when a checkpoint of ``run_dir`` gets its completion marker.

    Reacts to the marker file being created, written or renamed into place, and to a whole
    ``checkpoint-<step>`` folder being renamed into the run directory with its marker already inside.
    """

    def __init__(self, run_dir: Path, notify):
        self.run_dir = run_dir.resolve()
        self.notify = notify

    def on_any_event(self, event):
        if event.event_type not in ("created", "modified", "moved", "closed"):
            return
        path = Path(getattr(event, "dest_path", "") or event.src_path)
        if not event.is_directory and path.name == CHECKPOINT_COMPLETE:
            ckpt = path.parent
        elif event.is_directory and event.event_type in ("created", "moved") and is_complete_checkpoint(path):
            ckpt = path
        else:
            return
        if checkpoint_step(ckpt) is not None and ckpt.parent.resolve() == self.run_dir:
            self.notify(ckpt)


class CheckpointWatcher:
    """Runs the baseline, catch-up and watch phases for one run directory (``cfg.watch``).

    Args:
        cfg: the stage config; ``cfg.watch`` is the run directory.
    """

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.watch).resolve()
        self.resolver = self.wandb = None  # made by run()
        self.stop = threading.Event()  # set by a signal or stop condition; checked between evaluations
        self._wake = threading.Event()
        self.watching = threading.Event()  # set once baseline and catch-up are done and events are awaited
        self._pending: dict[Path, float] = {}  # checkpoint -> time of its latest marker event
        self._mutex = threading.Lock()
        self._signals = 0
        self.evaluated: list[str] = []  # names evaluated by this process, in order (for logs and tests)

    # ------------------------------------------------------------------------------------ bookkeeping

    def _on_marker(self, ckpt: Path) -> None:
        with self._mutex:
            self._pending[ckpt] = time.monotonic()
        self._wake.set()

    def _needs_eval(self, model: Path, out_dir: Path, log: bool = False) -> bool:
        if not is_evaluated(out_dir):
            return True
        record = read_results(out_dir)
        if record is None:
            return True
        reason = stale_reason(model, record)
        if reason is not None:
            if log:
                logger.info("%s: evaluating again: %s", model.name, reason)
            return True
        return self.cfg.retry_failed and record.get("status") != "ok"

    def _ordered(self, ckpts) -> list[Path]:
        return sorted(ckpts, key=checkpoint_step, reverse=self.cfg.order == "newest")

    def _reached_stop_step(self) -> bool:
        n = self.cfg.stop_after_step
        return n is not None and any(checkpoint_step(c) >= n and is_evaluated(results_dir(c))
                                     for c in complete_checkpoints(self.run_dir))

    def _handle_signal(self, signum, frame):
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt  # second signal: abandon the evaluation in progress (no marker is written)
        logger.info("signal %d: stopping after the current evaluation (send again to stop now)", signum)
        self.stop.set()
        self._wake.set()

    # ----------------------------------------------------------------------------------- evaluations

    def _evaluate(self, model: Path, out_dir: Path, name: str, baseline: bool = False) -> bool:
        """Evaluate one model under the results-folder lock; False when skipped."""
        if not model.is_dir():
            logger.info("%s: %s is gone (deleted), skipped", name, model)
            return False
        if not self._needs_eval(model, out_dir):
            return False
        try:
            out_dir.mkdir(exist_ok=True)
            lock = FileLock(str(out_dir / LOCK_NAME), timeout=0)
            lock.acquire()
        except FileNotFoundError:
            logger.info("%s: deleted before evaluation, skipped", name)
            return False
        except Timeout:
            logger.info("%s: another evaluator holds %s, skipped", name, out_dir / LOCK_NAME)
            return False
        try:
            if not self._needs_eval(model, out_dir, log=True):  # finished by another evaluator while we waited
                return False
            remove_stale_temporaries(out_dir)  # what a killed evaluator left (we hold the lock)
            if read_results(out_dir) is not None:  # stale or failed results: their summary row leaves now
                write_summary(self.run_dir)
            logger.info("%s: evaluating %s on %s (limit %s)", name, model, ",".join(self.cfg.tasks), self.cfg.limit)
            try:
                record = evaluate_into(model, out_dir, self.resolver, limit=self.cfg.limit,
                                       num_fewshot=self.cfg.num_fewshot, batch_size=self.cfg.batch_size,
                                       dtype=self.cfg.dtype, baseline=baseline)
            except FileNotFoundError:
                logger.info("%s: deleted during evaluation, results dropped", name)
                return False
            headline = {k: round(v, 4) for k, v in flat_metrics(record).items()}
            logger.info("%s: %s in %.1f s %s%s", name, record["status"], record["wall_time_s"], headline,
                        f" error: {record['error']}" if record["error"] else "")
            self.evaluated.append(name)
            self.wandb.log(record)
            write_summary(self.run_dir)
            logger.info("summary refreshed: %s", self.run_dir / "eval_summary.md")
            return True
        finally:
            lock.release()

    def _baseline(self) -> None:
        if self.cfg.baseline is None:
            return
        out_dir = self.run_dir / BASELINE_DIR
        previous = read_results(out_dir)
        if previous is not None and "fingerprint" not in previous and \
                Path(previous["model"]) != Path(self.cfg.baseline).resolve():  # newer records are checked by content
            logger.warning("baseline results in %s are for %s, not %s; delete that folder to re-evaluate",
                           out_dir, previous["model"], self.cfg.baseline)
        if not self._evaluate(Path(self.cfg.baseline), out_dir, "baseline", baseline=True) and is_evaluated(out_dir):
            logger.info("baseline: already evaluated (%s)", out_dir)

    def _catch_up(self) -> None:
        todo = [c for c in self._ordered(complete_checkpoints(self.run_dir)) if self._needs_eval(c, results_dir(c))]
        logger.info("catch-up: %d complete checkpoint(s) to evaluate", len(todo))
        for ckpt in todo:
            if self.stop.is_set():
                return
            self._evaluate(ckpt, results_dir(ckpt), ckpt.name)
            if self._reached_stop_step():
                self.stop.set()

    def _take_ready(self) -> list[Path]:
        now = time.monotonic()
        with self._mutex:
            ready = [c for c, t in self._pending.items() if now - t >= self.cfg.debounce_s]
            for c in ready:
                del self._pending[c]
        return self._ordered(ready)

    def _next_deadline(self) -> float:
        with self._mutex:
            if not self._pending:
                return self.cfg.rescan_s or 1.0
            return max(0.05, min(t for t in self._pending.values()) + self.cfg.debounce_s - time.monotonic())

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> list[str]:
        """Baseline, catch-up, then watch until a stop condition or signal.

        Returns:
            Names (``baseline``, ``checkpoint-<step>``) evaluated by this call, in order.

        Raises:
            moe_ds.run_layout.OutputError: the run directory is a file (or below one) or cannot be written.
            EvalError: an unknown task or a missing data file. Both before anything is written.
        """
        cfg = self.cfg
        check_output_dir(self.run_dir, "run")
        self.resolver = TaskResolver(cfg.tasks, cfg.data_dir, cfg.ppl_file)
        in_main = threading.current_thread() is threading.main_thread()
        old, observer = {}, None
        try:
            if not self.run_dir.exists():  # started before the training run: wait for it to appear
                logger.info("run directory %s does not exist yet; creating it and waiting for checkpoints",
                            self.run_dir)
                self.run_dir.mkdir(parents=True)
            write_json_atomic(self.run_dir / RESOLVED_CONFIG, {k: v for k, v in vars(cfg).items()})
            if in_main:
                old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            self.wandb = WandbLog(cfg, self.run_dir)
            if not cfg.once:
                # Started before catch-up, so markers written during catch-up are not lost (start() sets up
                # the inotify watches / first polling snapshot synchronously, leaving no gap).
                observer = PollingObserver(timeout=cfg.poll_interval_s) if cfg.polling else Observer()
                observer.schedule(MarkerHandler(self.run_dir, self._on_marker), str(self.run_dir), recursive=True)
                observer.start()
                logger.info("watching %s with %s", self.run_dir, type(observer).__name__)
            self._baseline()
            self._catch_up()
            if not (cfg.once or self._reached_stop_step()):
                self._watch()
        finally:
            if observer is not None:
                observer.stop()
                observer.join()
            if self.wandb is not None:
                self.wandb.finish()
            self.resolver.close()
            for s, h in old.items():
                signal.signal(s, h)
        if self.run_dir.exists() and self.evaluated:
            write_summary(self.run_dir)
        logger.info("evaluator done: evaluated %s", self.evaluated or "nothing")
        return self.evaluated

    def _watch(self) -> None:
        last_scan = time.monotonic()
        self.watching.set()
        logger.info("waiting for %s markers (debounce %.1f s)", CHECKPOINT_COMPLETE, self.cfg.debounce_s)
        while not self.stop.is_set():
            self._wake.wait(self._next_deadline())
            self._wake.clear()
            if self.cfg.rescan_s and time.monotonic() - last_scan >= self.cfg.rescan_s:
                last_scan = time.monotonic()
                for ckpt in complete_checkpoints(self.run_dir):
                    if self._needs_eval(ckpt, results_dir(ckpt)):
                        with self._mutex:
                            self._pending.setdefault(ckpt, 0.0)
            for ckpt in self._take_ready():
                if self.stop.is_set():
                    break
                self._evaluate(ckpt, results_dir(ckpt), ckpt.name)
                if self._reached_stop_step():
                    logger.info("a checkpoint at step >= %d is evaluated: stopping", self.cfg.stop_after_step)
                    self.stop.set()


def run_once(cfg: EvalConfig) -> dict:
    """Evaluate the single model ``cfg.checkpoint`` into ``cfg.out`` (default ``<checkpoint>/eval``).

    When the model is a ``checkpoint-<step>`` folder, its run directory's summary is refreshed too.

    Returns:
        The results record.

    Raises:
        moe_ds.run_layout.OutputError: the results folder is a file (or below one) or cannot be written.
        EvalError: an unknown task or a missing data file. Both before anything is written.
    """
    model = Path(cfg.checkpoint)
    out_dir = check_output_dir(Path(cfg.out) if cfg.out is not None else results_dir(model))
    resolver = TaskResolver(cfg.tasks, cfg.data_dir, cfg.ppl_file)
    if checkpoint_step(model) is not None and not is_complete_checkpoint(model):  # only with --allow-incomplete
        logger.warning("%s has no %s marker: evaluating it as it is now", model, CHECKPOINT_COMPLETE)
    in_run = checkpoint_step(model) is not None and cfg.out is None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        logger.info("evaluating %s on %s (limit %s)", model, ",".join(cfg.tasks), cfg.limit)
        record = evaluate_into(model, out_dir, resolver, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                               batch_size=cfg.batch_size, dtype=cfg.dtype)
    finally:
        resolver.close()
    logger.info("%s: %s -> %s%s", model, record["status"], out_dir,
                f" error: {record['error']}" if record["error"] else "")
    wandb = WandbLog(cfg, model.parent if in_run else out_dir)
    wandb.log(record)
    wandb.finish()
    if in_run:
        write_summary(model.parent)
    return record
