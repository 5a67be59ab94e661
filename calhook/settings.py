"""The one typed settings object of a process, read once from the environment.

Nothing else in calhook reads ``os.environ``. Every field is listed, with its variable name and
default, in the README's settings table (a test keeps the two in step).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import ipaddress
import re
import urllib.parse
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from calhook import redis_url
from calhook.constants import DEDUP_TTL_S_DEFAULT

_ENDPOINT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_ENDPOINT = "default"


class SettingsError(Exception):
    """Raised when the environment holds a setting calhook cannot use; names the variable."""


STANDARD_WEBHOOKS_PREFIX = "whsec_"


def decode_whsec(secret: str) -> bytes:
    """The key of a Standard Webhooks secret ``whsec_<base64>``; ValueError if it is not one.

    The message never repeats the secret.
    """
    if not secret.startswith(STANDARD_WEBHOOKS_PREFIX):
        raise ValueError(f"a standard-webhooks secret must start with {STANDARD_WEBHOOKS_PREFIX}")
    encoded = secret.removeprefix(STANDARD_WEBHOOKS_PREFIX)
    try:
        # Senders print the key with or without padding; both name the same bytes.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a standard-webhooks secret must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("a standard-webhooks secret must not be empty")
    return key


class Endpoint(BaseModel):
    """A webhook endpoint: how a delivery proves itself, and the accepted secrets.

    ``header``: a static secret in ``header`` (what Calenso sends). ``standard-webhooks``: an
    HMAC-SHA256 signature in ``webhook-signature`` over ``webhook-id``, ``webhook-timestamp`` and
    the body, with ``whsec_<base64>`` secrets (a signing proxy in front of Calenso, or another
    sender). Several secrets are accepted at once either way, for rotation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["header", "standard-webhooks"] = "header"
    header: str = "Authorization"
    secrets: tuple[SecretStr, ...] = ()

    @field_validator("secrets", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_csv(value)

    @model_validator(mode="after")
    def _signing_keys(self) -> Endpoint:
        if self.scheme == "standard-webhooks":
            for secret in self.secrets:
                decode_whsec(secret.get_secret_value())
        return self

    def signing_keys(self) -> tuple[bytes, ...]:
        """The decoded keys of a ``standard-webhooks`` endpoint."""
        return tuple(decode_whsec(s.get_secret_value()) for s in self.secrets)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP address or CIDR network") from None
    return value


def networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of comma-separated CIDR settings (validated when the settings were read)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


CsvList = Annotated[tuple[str, ...], NoDecode]
CsvSecrets = Annotated[tuple[SecretStr, ...], NoDecode]
CsvFloats = Annotated[tuple[float, ...], NoDecode]


class Settings(BaseSettings):
    """Every setting of calhook; the variable is ``CALHOOK_<FIELD>`` unless an alias says so."""

    model_config = SettingsConfigDict(
        env_prefix="CALHOOK_",
        extra="ignore",
        frozen=True,
        case_sensitive=False,
        populate_by_name=True,
    )

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL"),
        description="Broker Redis: redis://host:6379/0, or a master through Sentinel: "
        "redis+sentinel://host1:26379,host2:26379/master_name/0 (see calhook/redis_url.py). "
        "Unset: `calhook dev` and the tests start an embedded server.",
    )
    # Ingress
    host: str = Field("0.0.0.0", description="Address the ingress binds to.")  # noqa: S104
    port: int = Field(8080, ge=0, le=65535, description="Port the ingress listens on.")
    auth_header: str = Field(
        "Authorization", description="Header that carries the secret on the default endpoint."
    )
    auth_secrets: CsvSecrets = Field(
        (), description="Comma-separated secrets accepted on the default endpoint (rotation)."
    )
    allow_unauthenticated: bool = Field(
        False, description="Start without any secret (development only; warns on every start)."
    )
    endpoints: dict[str, Endpoint] = Field(
        default_factory=dict,
        description='Named endpoints as JSON: {"shop": {"header": "X-Key", "secrets": "a,b"}}, '
        'or {"relay": {"scheme": "standard-webhooks", "secrets": "whsec_…"}}, served at '
        "/webhooks/calenso/{name}.",
    )
    allowed_ips: CsvList = Field(
        (), description="Comma-separated client networks (CIDR) allowed to post; empty: any (403)."
    )
    trusted_proxies: CsvList = Field(
        (),
        description="Comma-separated proxy networks (CIDR) whose X-Forwarded-For is believed.",
    )
    admin_token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token of /status and /metrics on the public port; empty: both off.",
    )
    admin_host: str = Field("127.0.0.1", description="Address of the admin listener.")
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of a separate admin listener serving /metrics and /status without a "
        "token; set, the public port does not serve them.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest body accepted (413).")
    body_timeout_s: float = Field(
        10.0, gt=0, description="Deadline to receive a request's whole body (408)."
    )
    header_timeout_s: float = Field(
        15.0,
        gt=0,
        description="Deadline to receive a request's whole head, from the connection or the "
        "previous answer (also the keep-alive idle time).",
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request head: request line and header lines (431)."
    )
    max_headers: int = Field(64, ge=8, description="Most header lines in a request.")
    max_concurrent: int = Field(
        1024, ge=1, description="Webhook requests handled at once by a process (503 above)."
    )
    max_json_depth: int = Field(
        32, ge=1, le=1024, description="Deepest nesting of objects and arrays in a body (422)."
    )
    dedup_ttl_s: int = Field(
        DEDUP_TTL_S_DEFAULT, ge=86_400, description="How long a retransmission is recognised."
    )
    publish_batch_max: int = Field(
        256, ge=1, description="Most events written to Redis in one script call."
    )
    redis_timeout_s: float = Field(
        0.25, gt=0, description="Deadline of a Redis write from the ingress; the spool after it."
    )
    ack_durability: Literal["written", "fsynced", "replicated"] = Field(
        "written",
        description="When the ingress answers 202: `written` once Redis has the event in memory; "
        "`fsynced` once it is also in the master's append-only file on disk (WAITAOF, Redis 7.2+ "
        "or Valkey, with appendfsync always); `replicated` once CALHOOK_ACK_REPLICAS replicas "
        "have also received it (WAIT; and the master's disk where fsynced is possible). "
        "Unconfirmed in time: the spool.",
    )
    ack_replicas: int = Field(
        1, ge=1, description="Replicas that must confirm a write under `replicated`."
    )
    ack_assume_fsync_always: bool = Field(
        False,
        description="Take the broker's appendfsync to be `always` where it refuses CONFIG "
        "(managed services), so that `fsynced` is allowed on your word.",
    )
    ack_timeout_s: float = Field(
        1.5,
        gt=0,
        description="How long the ingress waits for each confirmation of a batch (the master's "
        "disk, then the replicas) before it spools the batch instead.",
    )
    spool_dir: str = Field(
        ".calhook/spool", description="Folder of the ingress's local spool (one slot a process)."
    )
    # Schemas
    created_tz: str = Field("UTC", description="Zone of Calenso's naive `created` timestamps.")
    # Workers
    handler_modules: CsvList = Field(
        (),
        description="Comma-separated handler modules the workers load besides the built-in "
        "ones and those installed (entry points `calhook.handlers`); `-NAME` switches a module, "
        "an entry point or a handler off.",
    )
    task_time_limit_s: int = Field(300, ge=1, description="Hard wall-time limit of one task.")
    visibility_timeout_s: int = Field(
        900, ge=1, description="Redis redelivers an unacked task after this; > task time limit."
    )
    recovery_s: float = Field(
        60.0,
        gt=0,
        description="A queued pair no worker has taken after this is checked by the scheduler: "
        "if its message is neither waiting nor held by a worker, it was lost and is queued again.",
    )
    lease_s: float = Field(
        60.0,
        ge=3,
        description="A running pair whose worker stops renewing it for this long is run again "
        "(its worker died); the heartbeat renews it every third of this.",
    )
    batch_max: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most events one task runs: a message names at most this many, and a worker "
        "that takes one adds the messages of the same handler waiting behind it up to this.",
    )
    async_concurrency: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Most events one async handler runs at once in a worker process (a "
        "handler's own `concurrency=` overrides it).",
    )
    order_wait_s: float = Field(
        1.0,
        gt=0,
        description="An ordered pair whose entity is being handled waits this long before it "
        "tries again (no attempt is spent).",
    )
    task_events: bool = Field(
        False,
        description="Workers send Celery's task events from the start (Flower turns them on by "
        "itself); they cost a publish per task.",
    )
    worker_max_memory_kb: int = Field(
        512_000, ge=0, description="Replace a worker child above this RSS (0: never)."
    )
    retry_schedule_s: CsvFloats = Field(
        (10.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0, 43200.0),
        description="Delays before the 2nd, 3rd … attempt of a failed handler (about a day).",
    )
    retry_jitter: float = Field(
        0.2, ge=0, le=1, description="Each delay varies by up to this fraction, either way."
    )
    quick_retries: int = Field(
        2, ge=0, le=10, description="In-call retries of a transient error before the schedule."
    )
    max_deliveries: int = Field(
        5,
        ge=2,
        description="An attempt started this often without finishing (its worker died each "
        "time) is dead-lettered as poison.",
    )
    scheduler_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often the scheduler queues what is due: retries, runs whose worker "
        "died, messages lost in transit.",
    )
    breaker_failures: int = Field(
        5,
        ge=0,
        description="Transient failures in a row (no success between) that open a circuit's "
        "breaker and hold its handlers (0: no breaker).",
    )
    breaker_window_s: float = Field(
        300.0, gt=0, description="The failures that open a breaker fall within this many seconds."
    )
    breaker_probe_s: float = Field(
        30.0,
        gt=0,
        description="An open breaker lets one held event through after this long, then after "
        "twice as long each time it fails again.",
    )
    breaker_probe_max_s: float = Field(
        900.0, gt=0, description="The longest an open breaker waits between two probes."
    )
    release_rate_per_s: float = Field(
        10.0,
        gt=0,
        description="How fast a resumed handler's held events are queued again, oldest first "
        "(calhook handlers resume --rate chooses another).",
    )
    ledger_ttl_s: int = Field(
        7 * 86_400,
        ge=86_400,
        description="How long an event's pair states stay once every pair is final (a late "
        "copy of a message finds them and runs nothing).",
    )
    soft_shutdown_s: float = Field(
        25.0, ge=0, description="On SIGTERM, let running tasks finish this long before requeue."
    )
    retention_days: int = Field(
        30,
        ge=1,
        description="Parked and dead-letter records, and event trails, are erased after this.",
    )
    trail_ttl_s: int = Field(
        7 * 86_400, ge=3600, description="How long each event's story is kept (calhook events)."
    )
    # CRM
    crm_kind: Literal["", "http", "hubspot"] = Field(
        "", description="`http` (the plain JSON contract), `hubspot`, or empty: no CRM handlers."
    )
    crm_url: str = Field(
        "", description="CRM base URL (`hubspot`: defaults to https://api.hubapi.com)."
    )
    crm_token: SecretStr = Field(SecretStr(""), description="Bearer token for the CRM.")
    crm_rate_per_s: float = Field(
        10.0, ge=0, description="Calls per second to the CRM, shared by all workers (0: no limit)."
    )
    crm_sync_bookings: bool = Field(
        True, description="Also upsert the customer of appointment and group-event bookings."
    )
    crm_timeout_s: float = Field(10.0, gt=0, description="Deadline of one CRM call.")
    hubspot_id_property: str = Field(
        "calenso_uuid",
        description="HubSpot contact property that identifies a Calenso customer (or `email`).",
    )
    # Notifications
    smtp_url: str = Field(
        "",
        description="smtp://[user:password@]host:port[?starttls=true], or smtps://…; empty: "
        "no e-mail.",
    )
    notify_from: str = Field("calhook@localhost", description="Sender of notification e-mails.")
    notify_to: CsvList = Field(
        (), description="Comma-separated addresses told of every notice, besides the staff member."
    )
    notify_staff: bool = Field(
        True, description="Also tell the staff member the booking was with (from the payload)."
    )
    chat_webhook_url: SecretStr = Field(
        SecretStr(""), description="Slack-compatible incoming webhook URL; empty: no chat."
    )
    notify_language: Literal["de", "en"] = Field(
        "de", description="Language of notices when the payload names none we have."
    )
    store_tz: str = Field("Europe/Zurich", description="Zone of the stores, for times in notices.")
    template_dir: str = Field(
        "", description="Folder of templates overriding the built-in ones (same file names)."
    )
    # Operational notices (workers/notices.py, run by `calhook scheduler`)
    notice_chat: bool | None = Field(
        None,
        description="Send operational notices (a breaker opened or closed, a failure group, a "
        "paused or resumed handler, the dead letters crossing their threshold) to "
        "CALHOOK_CHAT_WEBHOOK_URL; unset: yes when that is set.",
    )
    notice_email: CsvList = Field(
        (),
        description="Comma-separated addresses mailed each operational notice (through "
        "CALHOOK_SMTP_URL, from CALHOOK_NOTIFY_FROM); empty: none.",
    )
    notice_url: str = Field(
        "",
        description="An operator's http(s) URL each operational notice is POSTed to as JSON, "
        "signed as Standard Webhooks with CALHOOK_NOTICE_SECRET; empty: none.",
    )
    notice_secret: SecretStr = Field(
        SecretStr(""),
        description="The whsec_<base64> key that signs the notices POSTed to CALHOOK_NOTICE_URL "
        "(webhook-signature v1, HMAC-SHA256).",
    )
    notice_dead_letters: int = Field(
        100,
        ge=0,
        description="A notice when the dead letters reach this many, and one when they fall "
        "below it again (0: no such notice).",
    )
    # Operations
    log_format: Literal["json", "console"] = Field("json", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level.")
    data_dir: str = Field(".calhook", description="Folder of `calhook dev`'s embedded Redis.")

    @field_validator(
        "handler_modules",
        "auth_secrets",
        "retry_schedule_s",
        "notify_to",
        "notice_email",
        "allowed_ips",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return redis_url.validate(value) if value else value

    @field_validator("allowed_ips", "trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _networks(value)

    @field_validator("retry_schedule_s")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay <= 0 for delay in value):
            raise ValueError("retry delays must be positive")
        return value

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, value: dict[str, Endpoint]) -> dict[str, Endpoint]:
        for name in value:
            if not _ENDPOINT_NAME.match(name) or name == DEFAULT_ENDPOINT:
                raise ValueError(f"endpoint name {name!r} must match {_ENDPOINT_NAME.pattern}")
        return value

    @field_validator("created_tz", "store_tz")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("notice_email")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if "@" not in email.utils.parseaddr(address)[1]:
                # Not quoted: an address is personal data, and this message reaches the logs.
                raise ValueError("each address must be name@domain")
        return value

    @field_validator("notice_url")
    @classmethod
    def _notice_url(cls, value: str) -> str:
        if value:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("notice_secret")
    @classmethod
    def _notice_secret(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            decode_whsec(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _notice_channels(self) -> Settings:
        if self.notice_chat and not self.chat_webhook_url.get_secret_value():
            raise ValueError("CALHOOK_NOTICE_CHAT is true but CALHOOK_CHAT_WEBHOOK_URL is empty")
        if self.notice_email and not self.smtp_url:
            raise ValueError("CALHOOK_NOTICE_EMAIL is set but CALHOOK_SMTP_URL is empty")
        if self.notice_url and not self.notice_secret.get_secret_value():
            raise ValueError("CALHOOK_NOTICE_URL is set but CALHOOK_NOTICE_SECRET is empty")
        return self

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            # A task still running when its message becomes visible again runs twice
            # (RELIABILITY.md item 3).
            raise ValueError(
                "CALHOOK_VISIBILITY_TIMEOUT_S must be greater than CALHOOK_TASK_TIME_LIMIT_S"
            )
        return self

    @property
    def zone(self) -> ZoneInfo:
        """The zone of naive ``created`` timestamps."""
        return ZoneInfo(self.created_tz)

    @property
    def notices_to_chat(self) -> bool:
        """Whether operational notices go to the chat webhook (CALHOOK_NOTICE_CHAT, by default
        whenever the webhook is set)."""
        if self.notice_chat is not None:
            return self.notice_chat
        return bool(self.chat_webhook_url.get_secret_value())

    @property
    def retention_s(self) -> int:
        """``CALHOOK_RETENTION_DAYS`` in seconds."""
        return self.retention_days * 86_400

    @property
    def trail_keep_s(self) -> int:
        """How long a trail is kept: its TTL, never past the retention."""
        return min(self.trail_ttl_s, self.retention_s)

    def endpoint(self, name: str) -> Endpoint | None:
        """The endpoint called ``name`` (the default endpoint for ``"default"``), if any."""
        if name == DEFAULT_ENDPOINT:
            return Endpoint(header=self.auth_header, secrets=self.auth_secrets)
        return self.endpoints.get(name)

    def require_redis_url(self) -> str:
        """The broker URL, or a SettingsError naming the variable."""
        if not self.redis_url:
            raise SettingsError("REDIS_URL is not set (use `calhook dev` for an embedded Redis)")
        return self.redis_url


def env_names() -> dict[str, str]:
    """Map each settings field to the environment variable that sets it."""
    names = {}
    prefix = Settings.model_config.get("env_prefix", "")
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names[field_name] = str(alias.choices[0])
        else:
            names[field_name] = f"{prefix}{field_name}".upper()
    return names


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment; a bad value raises SettingsError naming it."""
    try:
        return Settings(**overrides)
    except PydanticSettingsError as exc:
        # A complex value (CALHOOK_ENDPOINTS) that is not JSON; the library names the field.
        field = str(exc).split('"')[1] if '"' in str(exc) else ""
        name = env_names().get(field, field or "a setting")
        raise SettingsError(f"{name}: not valid JSON") from None
    except ValidationError as exc:
        names = env_names()
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            problems.append(f"{names.get(field, field or 'settings')}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The settings of this process, read once."""
    return load_settings()
