"""OpenAI request bodies to tandem requests (pure): fields that map onto SamplingParams, prompts,
chat messages, and fields refused by name, never ignored."""
from __future__ import annotations

import pytest

from tandem.deploy.openai_requests import OpenAIError, parse_chat, parse_completion
from tandem.engine.params import SamplingParams


def test_sampling_fields_map_onto_sampling_params():
    parsed = parse_completion({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 1, "top_p": 1,
                               "top_k": 3, "seed": 9, "stop": ["a", "b"], "ignore_eos": True,
                               "stream": True, "stream_options": {"include_usage": True}, "logprobs": None,
                               "n": 1, "user": "u", "presence_penalty": 0})
    assert parsed.params == SamplingParams(max_tokens=5, temperature=1.0, top_p=1.0, top_k=3, seed=9,
                                           stop=("a", "b"), ignore_eos=True)
    assert (parsed.model, parsed.prompt, parsed.stream, parsed.include_usage) == ("m", "hi", True, True)
    assert parse_completion({"model": "m", "prompt": "x"}).params.max_tokens == 16  # OpenAI's default
    one_of_a_batch = parse_completion({"model": "m", "prompt": [[1, 2, 3]], "max_completion_tokens": 2})
    assert one_of_a_batch.prompt == [1, 2, 3] and one_of_a_batch.params.max_tokens == 2


@pytest.mark.parametrize("body,param", [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"logit_bias": {"1": 5}}, "logit_bias"), ({"frequency_penalty": 0.1}, "frequency_penalty"),
    ({"whatever": 1}, "whatever"), ({"temperature": -0.5}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0}, "top_p"), ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}},
                                                              "stream_options"),
    ({"max_tokens": 3, "max_completion_tokens": 3}, "max_tokens"), ({"model": ""}, "model"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, "x"]}, "prompt"), ({"prompt": None}, "prompt"),
])
def test_what_tandem_does_not_do_is_refused_by_name(body, param):
    with pytest.raises(OpenAIError) as caught:
        parse_completion({"model": "m", "prompt": "hi"} | body)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["param"] == param


def test_chat_messages_keep_role_and_content_for_the_template():
    parsed = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x"}],
                         "logprobs": False}, default_max_tokens=7)
    assert parsed.prompt == [{"role": "user", "content": "hi"}] and parsed.params.max_tokens == 7
    for messages, param in (([], "messages"), ([{"content": "x"}], "messages[0]"),
                            ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content")):
        with pytest.raises(OpenAIError) as caught:
            parse_chat({"model": "m", "messages": messages}, 7)
        assert caught.value.param == param
    with pytest.raises(OpenAIError) as caught:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 7)
    assert caught.value.param == "tools"


@pytest.mark.parametrize("argv,fragment", [
    (["--http", "host:port"], "expected [HOST:]PORT, got 'host:port'"),
    (["--http", "70000"], "expected [HOST:]PORT"),
    (["--http", "8000", "--detach"], "serves in the foreground: drop --detach"),
    (["--http-replicas", "2"], "--http-replicas needs --http [HOST:]PORT or an http section"),
    (["--http", "8000", "--http-replicas", "0"], "--http-replicas: must be 1 to 64, got 0"),
])
def test_serve_refuses_a_bad_http_address_before_starting_anything(argv, fragment, capsys):
    from pathlib import Path

    from tandem.deploy.cli import main

    spec = Path(__file__).resolve().parents[2] / "deploy" / "specs" / "smollm2-cpu.yaml"
    assert main(["serve", str(spec), *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_an_http_address_defaults_to_this_machine():
    from tandem.deploy.openai_server import parse_address

    assert parse_address("8000") == ("127.0.0.1", 8000)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)


def test_logprobs_as_each_endpoint_defines_them():
    completion = parse_completion({"model": "m", "prompt": "hi", "logprobs": 5})
    assert (completion.params.logprobs, completion.params.top_logprobs) == (True, 5)
    chosen_only = parse_completion({"model": "m", "prompt": "hi", "logprobs": 0})
    assert (chosen_only.params.logprobs, chosen_only.params.top_logprobs) == (True, 0)
    assert not parse_completion({"model": "m", "prompt": "hi", "logprobs": None}).params.logprobs
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                       "top_logprobs": 3}, default_max_tokens=4)
    assert (chat.params.logprobs, chat.params.top_logprobs) == (True, 3)
    for body, param in (({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": 1}, "logprobs"),
                        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
        with pytest.raises(OpenAIError) as caught:
            parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]} | body, default_max_tokens=4)
        assert caught.value.status == 400 and caught.value.param == param


def test_the_grafana_dashboard_queries_only_metrics_the_front_end_exports():
    import json
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from tandem.deploy.openai_metrics import Metrics

    stats = {"instances": {"c-decode-0": {"running": 1, "waiting": 0, "free_blocks": 3, "num_blocks": 4,
                                          "preemptions": 0}},
             "migrations": {"started": 0, "committed": 0, "resumed": 0, "cancelled": 0}}
    metrics = Metrics(lambda: stats)
    metrics.observe({"ttft": 0.1, "tpot": 0.01, "finish": 1.0, "prefill_start": 0.01, "prefill_end": 0.05,
                     "transfer_time": 0.002, "transfer_bytes": 8192.0}, "length", [0.01])
    metrics.finished.labels("length")
    exported = {sample.name for family in text_string_to_metric_families(metrics.exposition().decode())
                for sample in family.samples}
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/tandem-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"tandem:[a-z0-9_:]+", target["expr"])}
    assert len(dashboard["panels"]) >= 12 and queried
    assert queried <= exported, queried - exported
