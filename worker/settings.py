"""Runtime settings, read once from CONVSTATS_* environment variables."""

from __future__ import annotations

import pydantic
import pydantic_settings

from worker import stack


class Settings(pydantic_settings.BaseSettings):
    """Everything the worker, relay and tools can be tuned with.

    Each field is read from the environment variable of the same name in upper case
    with the ``CONVSTATS_`` prefix, e.g. ``CONVSTATS_BATCH_SIZE=500``.
    """

    model_config = pydantic_settings.SettingsConfigDict(
        env_prefix="CONVSTATS_", extra="ignore", frozen=True
    )

    # A libpq URL, e.g. postgresql://user:pass@host:5432/db. Unset, the local
    # stack's (whose ports CONVSTATS_STACK_* may move).
    database_url: str = pydantic.Field(default_factory=lambda: stack.env().database_url)
    # host:port[,host:port]
    kafka_bootstrap_servers: str = pydantic.Field(
        default_factory=lambda: stack.env().kafka_bootstrap_servers
    )

    messages_topic: str = "message-created"
    updates_topic: str = "conversation-updated"
    dead_letter_topic: str = "message-created.dlq"
    consumer_group: str = "convstats"

    # A batch closes when it holds batch_size events or batch_wait_ms have passed.
    batch_size: int = pydantic.Field(default=1000, ge=1, le=100_000)
    batch_wait_ms: int = pydantic.Field(default=200, ge=0)

    # Kept below max_poll_interval_ms so a stuck statement cannot get this member
    # evicted from the group over and over: it fails, the batch is retried.
    db_statement_timeout_s: float = pydantic.Field(default=30.0, gt=0)
    max_poll_interval_ms: int = pydantic.Field(default=300_000, ge=10_000)
    db_pool_size: int = pydantic.Field(default=4, ge=2)

    # A created_at further in the future than this is rejected: it would pin
    # last_message_at ahead of every real message.
    max_clock_skew_s: float = pydantic.Field(default=300.0, ge=0)

    # How long a message waits for its user to appear in `users` before it is
    # dead-lettered.
    unknown_user_retry_s: float = pydantic.Field(default=60.0, ge=0)

    relay_batch_size: int = pydantic.Field(default=2000, ge=1)
    relay_poll_interval_s: float = pydantic.Field(default=1.0, gt=0)
    # Published outbox rows are kept this long for audit, then purged.
    outbox_retention_s: float = pydantic.Field(default=86_400.0, ge=0)

    http_host: str = "127.0.0.1"
    # 0 disables the /metrics, /healthz and /readyz server.
    http_port: int = pydantic.Field(default=9108, ge=0, le=65535)

    shutdown_timeout_s: float = pydantic.Field(default=30.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _statement_timeout_below_poll_interval(self) -> Settings:
        # A statement that may outlast the poll interval gets this member evicted,
        # its batch redelivered to another member, which blocks on the same rows.
        if self.db_statement_timeout_s * 1000 >= self.max_poll_interval_ms / 2:
            raise ValueError(
                "db_statement_timeout_s must be under half of max_poll_interval_ms"
            )
        return self
