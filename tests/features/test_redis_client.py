"""The one Redis factory: the topology, credentials and TLS of the settings reach clients and Feast alike."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster

from adloop.settings import Settings
from features.redis_client import connection_kwargs, feast_online_store, redis_client
from tests.support.stack import TEST_REDIS_DB

NODES = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"


def test_standalone_url_gives_host_port_db_and_credentials() -> None:
    settings = Settings(redis_url="rediss://adloop:s%40cret@10.0.0.1:6380/3")
    assert connection_kwargs(settings) == {
        "username": "adloop",
        "password": "s@cret",
        "ssl": True,
        "host": "10.0.0.1",
        "port": 6380,
        "db": 3,
    }
    assert feast_online_store(settings) == ("redis", "10.0.0.1:6380,db=3,username=adloop,password=s@cret,ssl=true")


def test_cluster_takes_nodes_from_the_list_and_credentials_from_the_url() -> None:
    settings = Settings(redis_url="rediss://:pw@ignored:1/0", redis_cluster_nodes=NODES)
    assert connection_kwargs(settings) == {"password": "pw", "ssl": True}
    assert feast_online_store(settings) == ("redis_cluster", f"{NODES},password=pw,ssl=true")


def test_a_url_that_is_not_redis_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="ADLOOP_REDIS_URL"):
        connection_kwargs(Settings(redis_url="http://127.0.0.1:6379"))


@pytest.mark.integration
def test_the_standalone_client_reaches_the_configured_database() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
    client = redis_client(settings, timeout_s=2.0)
    assert isinstance(client, redis.Redis) and not isinstance(client, RedisCluster)
    client.set("adloop:test:factory", "1")
    assert redis.Redis(db=TEST_REDIS_DB).get("adloop:test:factory") == b"1"
    client.delete("adloop:test:factory")


def test_tls_options_of_the_url_reach_the_client() -> None:
    settings = Settings(redis_url="rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=none")
    kwargs = connection_kwargs(settings)
    assert (kwargs["ssl"], kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == (True, "/etc/ca.pem", "none")
