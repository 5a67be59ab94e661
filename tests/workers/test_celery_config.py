"""The Celery settings RELIABILITY.md asks for, checked on the app and on a live connection."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from calhook.settings import Settings, SettingsError
from workers.app import create_celery


def test_reliability_settings_are_on(make_settings: Callable[..., Settings]) -> None:
    conf = create_celery(make_settings(task_time_limit_s=120, visibility_timeout_s=600)).conf

    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.worker_soft_shutdown_timeout > 0
    assert conf.task_time_limit == 120
    assert conf.task_soft_time_limit < conf.task_time_limit


def test_visibility_timeout_takes_effect_on_the_broker_channel(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    # RELIABILITY.md item 10: the setting has been silently ignored before; read it back from
    # the channel kombu actually uses.
    app = create_celery(make_settings(task_time_limit_s=120, visibility_timeout_s=777))

    with app.connection_for_read() as connection:
        visibility_timeout = connection.default_channel.visibility_timeout  # type: ignore[attr-defined]
        assert visibility_timeout == 777
        assert visibility_timeout > app.conf.task_time_limit


def test_visibility_timeout_must_exceed_the_time_limit(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(SettingsError, match="CALHOOK_VISIBILITY_TIMEOUT_S must be greater"):
        make_settings(task_time_limit_s=600, visibility_timeout_s=600)
