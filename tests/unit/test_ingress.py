"""Several ingress processes: an address in use fails before any starts; in Prometheus'
multiprocess mode a scrape of any one of them sums the requests every process observed, including
a process that has since died; without the mode a process reports only its own."""
from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

OBSERVE = """
import sys
from tandem.deploy.openai_metrics import Metrics
metrics = Metrics(lambda: {{"instances": {{}}, "migrations": {{}}}})
for _ in range({count}):
    metrics.observe({{"ttft": 0.2, "num_output_tokens": 3}}, "length", [0.01, 0.02])
sys.stdout.buffer.write(metrics.exposition())
"""


def _process(count: int, env: dict[str, str]) -> dict[str, float]:
    """Run a process that observes ``count`` finished requests and returns its scrape."""
    out = subprocess.run([sys.executable, "-c", OBSERVE.format(count=count)], env=env, check=True,
                         capture_output=True, timeout=60).stdout.decode()
    return {sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(out) for sample in family.samples}


def _value(samples: dict[str, float], name: str, **labels: str) -> float:
    return samples[name + str(sorted(labels.items()))]


def test_any_replica_scrape_sums_every_replicas_requests(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    _process(2, env)  # a replica that served two requests and exited
    scrape = _process(3, env)
    assert _value(scrape, "tandem:request_success_total", finished_reason="length") == 5
    assert _value(scrape, "tandem:generation_tokens_total") == 15
    assert _value(scrape, "tandem:time_to_first_token_seconds_count") == 5
    assert _value(scrape, "tandem:inter_token_latency_seconds_count") == 10


def test_a_lone_ingress_reports_only_its_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    _process(2, env)
    scrape = _process(3, env)
    assert _value(scrape, "tandem:request_success_total", finished_reason="length") == 3


def test_an_address_in_use_fails_before_any_replica_starts():
    import socket

    import pytest

    from tandem.deploy.ingress import IngressError, IngressReplicas

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ingress = IngressReplicas("c", ["c"], ("127.0.0.1", port), 2)
        with pytest.raises(IngressError, match=f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use"):
            ingress.start()
        assert ingress.pids == [] and not ingress.state_dir.exists()
