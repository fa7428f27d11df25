"""Celery's worker application with kiln's signals: SIGHUP is a warm shutdown and SIGUSR1 logs
the stacks (worker/process_signals.py says why both differ from Celery's)."""

from __future__ import annotations

from celery.apps import worker as celery_worker


class KilnWorker(celery_worker.Worker):
    def install_platform_tweaks(self, worker: celery_worker.Worker) -> None:
        """Celery's SIGTERM, SIGQUIT, SIGINT (and CELERY_RDBSIG) handlers, as its own method
        installs them on Linux, without its SIGHUP and SIGUSR1: kiln's stay (worker/process_signals.py)."""
        from worker.process_signals import pass_on_stop, release_when_ready

        celery_worker.install_worker_term_handler(worker)
        celery_worker.install_worker_term_hard_handler(worker)
        celery_worker.install_worker_int_handler(worker)
        celery_worker.install_rdb_handler()
        release_when_ready()  # SIGHUP: a warm shutdown from here on, also while Redis is not there yet
        pass_on_stop()
