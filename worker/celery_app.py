"""The Celery application: one worker process per GPU, one job at a time, on the `train` queue.

Messages carry only a job id. `acks_late` with `reject_on_worker_lost` puts a
job back on the queue when its worker dies mid-run; the job row (and its
checkpoints) say where to resume.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.signals import setup_logging

from app.core.config import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("sbora", broker=settings.resolved_broker_url)
    transport_options: dict = {}
    if settings.resolved_broker_url.startswith("filesystem"):
        # The embedded default: messages are files in the data directory, no server needed.
        queue_dir = settings.broker_folder / "queue"
        processed = settings.broker_folder / "processed"
        control = settings.broker_folder / "control"  # exchange tables; kombu's default is ./control
        for folder in (queue_dir, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        transport_options = {"data_folder_in": str(queue_dir), "data_folder_out": str(queue_dir),
                             "processed_folder": str(processed), "control_folder": str(control),
                             "store_processed": False}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.train_queue,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        imports=["worker.tasks"],
    )
    return app


@lru_cache
def get_celery() -> Celery:
    """The application for the current settings (tests switch settings and clear this cache)."""
    return make_celery(get_settings())


@setup_logging.connect
def _structured_logs(**_) -> None:
    """Celery leaves logging alone when this signal has a receiver: ours writes JSON lines."""
    from app.logs import configure_logging

    configure_logging()


# `celery -A worker.celery_app worker` looks for this name.
celery = get_celery()
