"""REDIS_URL: the two accepted forms, and a clear refusal of anything else."""

from __future__ import annotations

import pytest

from calhook.redis_url import RedisURLError, describe, parse_sentinel, validate
from calhook.settings import Settings
from calhook.store.connect import celery_broker


def test_a_plain_url_is_not_sentinel() -> None:
    assert parse_sentinel("redis://localhost:6379/0") is None
    assert parse_sentinel("rediss://:pw@cache.example:6380/1") is None
    assert parse_sentinel("unix:///run/redis.sock?db=0") is None


def test_sentinel_url_names_every_sentinel_the_master_and_the_database() -> None:
    target = parse_sentinel("redis+sentinel://s1:26380,s2,10.0.0.3:26381/mymaster/3")
    assert target is not None
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("10.0.0.3", 26381))
    assert (target.master_name, target.db) == ("mymaster", 3)
    assert target.password is None
    assert target.sentinel_password is None


def test_sentinel_url_credentials_master_and_sentinels_apart() -> None:
    target = parse_sentinel(
        "redis+sentinel://app:p%40ss@s1,s2/mymaster?sentinel_password=s%2Fecret"
    )
    assert target is not None
    assert (target.username, target.password, target.db) == ("app", "p@ss", 0)
    assert target.sentinel_password == "s/ecret"
    # Secrets stay out of the text of the target and of its description.
    assert "p@ss" not in repr(target)
    assert "ecret" not in target.describe()
    assert target.describe() == "redis+sentinel://s1:26379,s2:26379/mymaster/0"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("localhost:6379", "has no scheme"),
        ("sentinel://s1:26379;sentinel://s2:26379", r"name Sentinel as redis\+sentinel://"),
        ("rediss+sentinel://s1/mymaster", "TLS to Sentinel is not supported"),
        ("http://s1/mymaster", "scheme http:// is not supported"),
        ("redis+sentinel://s1,s2", "names no master"),
        ("redis+sentinel:///mymaster", "names no sentinel"),
        ("redis+sentinel://s1:port/mymaster", "has a bad port"),
        ("redis+sentinel://s1/mymaster/zero", "database 'zero' is not a number"),
        ("redis+sentinel://s1/mymaster/0/extra", "path must be /master_name"),
        ("redis+sentinel://s1/mymaster?master_password=x", "master_password not understood"),
        ("redis://:secret@:6379/0", "names no host"),
    ],
)
def test_a_bad_url_is_refused_with_its_reason(url: str, reason: str) -> None:
    with pytest.raises(RedisURLError, match=reason) as caught:
        validate(url)
    assert "secret" not in str(caught.value)


def test_settings_refuse_a_bad_url_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="REDIS_URL scheme sentinel:// is not supported"):
        Settings(redis_url="sentinel://s1:26379")
    url = "redis+sentinel://s1,s2/mymaster/0"
    assert Settings(redis_url=url).redis_url == url


def test_describe_hides_the_password() -> None:
    assert describe("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert describe("redis+sentinel://:hunter2@s1/m") == "redis+sentinel://s1:26379/m/0"


def test_celery_gets_every_sentinel_and_the_master_name() -> None:
    broker, options = celery_broker("redis+sentinel://:p%3Bw@s1,s2:26380/mymaster/2")
    assert broker == "sentinel://:p%3Bw@s1:26379/2;sentinel://:p%3Bw@s2:26380/2"
    assert options["master_name"] == "mymaster"
    assert celery_broker("redis://cache:6379/0") == ("redis://cache:6379/0", {})
