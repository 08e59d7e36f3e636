"""Producer throughput: replay a file to a fresh topic on the local broker, gzip vs no compression.

    python -m bench.produce [PATH] [--format taobao] [--runs 3]

Default PATH: the Taobao slice in ../shared/data, else the committed OBD slice. Events are read
and validated once, before timing, so the figures are the producer's (send + flush, acks=all).
Prints the median and worst rate per compression and their ratio. The topic is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import uuid
import warnings
from pathlib import Path

from adloop.settings import PROJECT_ROOT, get_settings
from streaming.producer import build_producer, produce_events
from streaming.replay import read

SHARED_DATA = Path(os.environ.get("ADLOOP_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")
TAOBAO = SHARED_DATA / "taobao" / "UserBehavior_timeslice.csv"
OBD = PROJECT_ROOT / "data" / "obd" / "random" / "all" / "all.csv"


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    default = (TAOBAO, "taobao") if TAOBAO.exists() else (OBD, "obd")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=default[0])
    parser.add_argument("--format", default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    fmt = args.format or (default[1] if args.path == default[0] else "jsonl")

    from kafka.admin import KafkaAdminClient, NewTopic

    settings = get_settings()
    events = list(read(args.path, fmt))
    topic = f"adloop.bench.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, settings.event_partitions, 1)])
    try:
        rates = {}
        for compression in ("gzip", None):
            rates[compression] = []
            for _ in range(args.runs):
                producer = build_producer(settings, compression_type=compression)
                summary = produce_events(producer, topic, events)
                producer.close()
                rates[compression].append(summary.rate)
    finally:
        admin.delete_topics([topic])
        admin.close()
    print(f"{len(events):,} {fmt} events from {args.path}, {args.runs} runs each, acks=all, linger 20 ms")
    for compression, values in rates.items():
        print(
            f"  {compression or 'none':5} median {statistics.median(values):9,.0f} ev/s  worst {min(values):9,.0f} ev/s"
        )
    ratio = statistics.median(rates["gzip"]) / statistics.median(rates[None])
    print(f"  gzip / none: {ratio:.2f}x")


if __name__ == "__main__":
    main()
