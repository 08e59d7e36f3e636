"""`adloop stack up --redis-cluster`: a real 3-master Redis Cluster on loopback, its slots, and `down`."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from adloop.settings import Settings
from adloop.stack import redis_cluster as cluster
from tests.support.stack import free_cluster_ports

pytestmark = pytest.mark.integration


def test_a_three_master_cluster_serves_every_slot_and_stops(tmp_path: Path) -> None:
    ports = free_cluster_ports(3)
    settings = Settings(stack_dir=tmp_path, redis_cluster_nodes=",".join(f"127.0.0.1:{p}" for p in ports))
    try:
        cluster.start_cluster(settings)
        table = cluster.slot_table(settings)
        assert len(table) == 3 and sum(count for _, count, _ in table) == cluster.SLOTS
        client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports])
        for i in range(50):  # keys land on every master
            client.set(f"k{i}", i)
        assert sorted(int(client.get(f"k{i}")) for i in range(50)) == list(range(50))
        assert {client.get_node_from_key(f"k{i}").port for i in range(50)} == set(ports)
        cluster.start_cluster(settings)  # idempotent: already up and created
    finally:
        stopped = cluster.stop_cluster(settings)
    assert len(stopped) == 3
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=ports[0], socket_connect_timeout=1).ping()
