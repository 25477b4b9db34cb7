"""The OpenAI-compatible HTTP front end, driven by the official ``openai`` SDK against a served tiny
model: completions and chat, streaming and not, give the text ``LLM.generate`` gives for the same
prompt (chat: the prompt the model's chat template renders) and parameters, with the right usage;
bad requests get OpenAI-shaped errors naming the field; a client that disconnects mid-stream leaves
every KV block free."""
from __future__ import annotations

import json
import shutil
import socket
import threading

import pytest

from tandem.engine import LLM, SamplingParams
from tests.integration.conftest import assert_all_blocks_free, wait_until

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'robot' %}{{ raise_exception('no robots') }}"
            "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a chat template."""
    path = tmp_path_factory.mktemp("chatmodel") / "m"
    shutil.copytree(tiny_llama_dir, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(ray_cluster, model_dir):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.deploy.openai_server import Served, http_server
    from tandem.engine.engine import EngineConfig
    from tandem.engine.pacing import StepPace

    # Decode steps last at least 20 ms: a 480-token request cannot finish in under 9.6 s.
    pace = StepPace(prefill=(0.0, 0.0, 0.0), decode=(0.02, 0.0, 0.0))
    engine = EngineConfig(dtype="float32", num_blocks=128, block_size=16, max_model_len=512, step_pace=pace)
    group = InstanceGroup(1, engine, num_cpus=0.5)
    cluster = Cluster.launch(LaunchConfig(name="http", model_dir=str(model_dir), prefill=group, decode=group,
                                          transfer_backend="shm"), timeout_s=120)
    client = cluster.client(timeout_s=60)
    served = Served(client, ["http", "tiny"], client.limits()["max_tokens"], api_key=KEY)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uvicorn_server = http_server(served, "127.0.0.1", port)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    wait_until(lambda: uvicorn_server.started)
    yield cluster, f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(10)
    cluster.shutdown()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", num_blocks=128)


def _openai(server):
    import openai

    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


PROMPT = "The quick brown fox"
CASES = [dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True}),
         dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "top_k": 20})]


def _params(case: dict) -> SamplingParams:
    fields = {k: v for k, v in case.items() if k != "extra_body"}
    return SamplingParams(**fields, **case["extra_body"])


@pytest.mark.parametrize("case", CASES, ids=["greedy", "seeded"])
@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_llm_generate(server, llm, case, stream):
    expected = llm.generate([PROMPT], _params(case))[0]
    api = _openai(server)
    if stream:
        events = list(api.completions.create(model="tiny", prompt=PROMPT, stream=True,
                                             stream_options={"include_usage": True}, **case))
        text = "".join(e.choices[0].text for e in events if e.choices)
        usage, finish = events[-1].usage, [e.choices[0].finish_reason for e in events if e.choices][-1]
    else:
        out = api.completions.create(model="tiny", prompt=PROMPT, **case)
        text, usage, finish = out.choices[0].text, out.usage, out.choices[0].finish_reason
    assert text == expected.text and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_token_ids),
                                                              len(expected.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_prompt_of_token_ids_is_taken_as_is(server, llm):
    ids = [5, 80, 81, 82, 40]
    expected = llm.generate([ids], _params(CASES[0]))[0]
    out = _openai(server).completions.create(model="http", prompt=ids, **CASES[0])
    assert out.choices[0].text == expected.text and out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_applies_the_models_template(server, llm, model_dir, stream):
    from tandem.engine.prepare import render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = llm.generate([render_chat(model_dir, messages)], _params(CASES[0]))[0]
    api = _openai(server)
    if stream:
        events = list(api.chat.completions.create(model="tiny", messages=messages, stream=True, **CASES[0]))
        assert events[0].choices[0].delta.role == "assistant"
        text = "".join(e.choices[0].delta.content or "" for e in events)
        assert events[-1].choices[0].finish_reason == "length"
    else:
        out = api.chat.completions.create(model="tiny", messages=messages, **CASES[0])
        text = out.choices[0].message.content
        assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 12
    assert text == expected.text


def test_chat_without_max_tokens_may_run_to_the_context_end(server):
    long = "y" * 480  # leaves a few dozen tokens of the 512-token context
    out = _openai(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": long}], temperature=0, max_tokens=None,
        extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 512
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("fields,status,param", [
    (dict(n=2), 400, "n"),
    (dict(presence_penalty=0.5), 400, "presence_penalty"),
    (dict(logprobs=21), 400, "logprobs"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(extra_body={"frobnicate": 1}), 400, "frobnicate"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(prompt="x" * 600, max_tokens=1), 400, None),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, fields, status, param):
    import openai

    request = dict(model="tiny", prompt=PROMPT, max_tokens=4) | fields
    with pytest.raises(openai.APIStatusError) as caught:
        _openai(server).completions.create(**request)
    assert caught.value.status_code == status
    error = caught.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["param"] == param


def test_a_conversation_the_template_refuses_is_a_400(server):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        _openai(server).chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert caught.value.body["param"] == "messages" and "no robots" in caught.value.body["message"]


def test_a_missing_api_key_is_refused(server):
    import openai

    api = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)


def test_models_and_health(server):
    assert [m.id for m in _openai(server).models.list()] == ["http", "tiny"]
    import urllib.request

    with urllib.request.urlopen(f"{server[1]}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    import http.client

    host, port = server[1].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    connection.request("POST", "/v1/completions", body,
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # gone mid-stream
    cluster = server[0]
    # Aborted: run to its end, it would take at least 9.6 s (the fixture's step pace).
    wait_until(lambda: cluster.stats()["requests"] == 0, timeout_s=5)
    assert_all_blocks_free(cluster)


def test_the_python_client_and_llm_chat_render_the_same_way(server, llm, model_dir):
    import asyncio

    from tests.reference import hf_greedy

    messages = [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "What?"},
                {"role": "user", "content": "Anything"}]
    params = _params(CASES[0])
    (local,) = llm.chat(messages, params)
    assert local.token_ids == hf_greedy(model_dir, [local.prompt_token_ids], 12)[0]  # transformers
    client = server[0].client(timeout_s=60)
    remote = client.chat(messages, params)
    assert (remote.token_ids, remote.prompt_token_ids) == (local.token_ids, local.prompt_token_ids)

    async def stream():
        return [t async for chunk in client.astream_chat(messages, params) for t in chunk.token_ids]
    assert asyncio.run(stream()) == local.token_ids


def test_metrics_parse_and_count_the_requests_served(server):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"{server[1]}/metrics", timeout=30) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
                samples[key] = sample.value
        return samples

    before = scrape()
    api = _openai(server)
    api.completions.create(model="tiny", prompt=PROMPT, **CASES[0])
    list(api.completions.create(model="tiny", prompt=PROMPT, stream=True, **CASES[1]))
    after = scrape()
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert delta("tandem:request_success_total{finished_reason=length}") == 2
    assert delta("tandem:generation_tokens_total") == 12 + 10
    assert delta("tandem:prompt_tokens_total") == 2 * len(PROMPT)  # one token per byte
    assert delta("tandem:time_to_first_token_seconds_count") == 2
    assert delta("tandem:kv_transfer_time_seconds_count") == 2
    assert delta("tandem:inter_token_latency_seconds_count") == (12 - 1) + (10 - 1)
    # The tiny model's KV: 2 layers x K/V x 16 tokens x 2 heads x 16 dims x 4 bytes = 8 KiB a block,
    # and each prompt of 19 byte tokens fills 2 blocks.
    assert delta("tandem:kv_transfer_bytes_total") == 2 * 2 * 8192
    assert after["tandem:kv_cache_usage_perc{instance=http-decode-0}"] >= 0
    assert "tandem:num_requests_running{instance=http-prefill-0}" in after
    assert "tandem:migrations_total{outcome=committed}" in after


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_come_in_each_endpoints_shape_and_match_the_engine(server, llm, model_dir, stream):
    """Completions: ``logprobs=N``; chat: ``logprobs`` + ``top_logprobs``. The values are the
    engine's (themselves checked against transformers in tests/unit/test_sampling.py), labelled
    with each token's own text."""
    from tandem.engine.prepare import render_chat

    api, text = _openai(server), (lambda t: llm.tokenizer.decode([t]))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    want = llm.generate([PROMPT], params)[0]
    request = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                   extra_body={"ignore_eos": True}, stream=stream)
    out = api.completions.create(**request)
    parts = [c.choices[0].logprobs for c in out if c.choices and c.choices[0].logprobs] if stream \
        else [out.choices[0].logprobs]
    tokens = [t for p in parts for t in p.tokens]
    assert tokens == [text(t) for t in want.token_ids]
    assert [o for p in parts for o in p.text_offset] == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    _close([lp for p in parts for lp in p.token_logprobs], want.logprobs)
    tops = [top for p in parts for top in p.top_logprobs]
    for got, top in zip(tops, want.top_logprobs, strict=True):
        expected: dict[str, float] = {}
        for t in top:  # tokens that decode alike share a key: the most likely one keeps it
            expected.setdefault(text(t.token_id), t.logprob)
        assert list(got) == list(expected)
        _close(list(got.values()), list(expected.values()))

    messages = [{"role": "user", "content": "Hi there"}]
    want = llm.generate([render_chat(model_dir, messages)], params)[0]
    out = api.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=3, extra_body={"ignore_eos": True}, stream=stream)
    content = [e for c in out if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content] \
        if stream else out.choices[0].logprobs.content
    assert [e.token for e in content] == [text(t) for t in want.token_ids]
    assert all(e.bytes == list(e.token.encode()) for e in content)
    _close([e.logprob for e in content], want.logprobs)
    for entry, top in zip(content, want.top_logprobs, strict=True):
        assert [t.token for t in entry.top_logprobs] == [text(t.token_id) for t in top]


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want)), (got, want)


def test_tandem_bench_measures_the_server_and_writes_the_table_and_plots(server, tmp_path, capsys):
    from matplotlib.image import imread

    from tandem.deploy.cli import main

    out = tmp_path / "bench"
    args = ["bench", f"{server[1]}/v1", "--model", "tiny", "--api-key", KEY, "--rates", "4", "16",
            "--requests", "8", "--input-len", "4:16", "--output-len", "4:8", "--max-len", "512",
            "--token-range", "3", "250", "--ttft-ms", "5000", "--tpot-ms", "1000", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 4 | 8 | 0 |" in printed and "| 16 | 8 | 0 |" in printed and "goodput (highest rate meeting it): 16 req/s" in printed
    results = json.loads((out / "results.json").read_text())
    for rate in ("4.0", "16.0"):
        timings = results["requests"][rate]
        assert len(timings) == 8 and all(t["error"] is None for t in timings)
        assert all(t["output_tokens"] == t["output_len"] and len(t["token_times"]) >= 1 for t in timings)
    # The server's decode steps last at least 20 ms (its pace): the client-side TPOT must see that.
    assert all(row["tpot_ms"][0] >= 19 for row in results["rows"])
    assert (out / "table.md").read_text().startswith("| rate (req/s) |")
    for name in ("attainment.png", "latency_cdf.png", "timeline.png"):
        image = imread(out / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 500 and image.std() > 0.01  # drawn, not blank


@pytest.fixture
def replicated(server, ray_cluster):
    """Two ingress processes on one port in front of the served cluster, watched for deaths."""
    from tandem.deploy.ingress import IngressReplicas

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ingress = IngressReplicas("http", ["http", "tiny"], ("127.0.0.1", port), 2, KEY,
                              ray_cluster.get_runtime_context().gcs_address)
    ingress.start()
    stop = threading.Event()
    watcher = threading.Thread(target=ingress.watch, args=(stop, 0.1), daemon=True)
    watcher.start()
    yield ingress, f"http://127.0.0.1:{port}"
    stop.set()
    watcher.join(10)
    ingress.close()


def test_ingress_replicas_share_a_port_sum_their_metrics_and_a_dead_one_is_restarted(replicated, llm):
    import os
    import signal
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    ingress, url = replicated
    expected = llm.generate([PROMPT], _params(CASES[0]))[0]

    def complete() -> str:  # a fresh connection each time: the kernel hands it to any live replica
        return _openai((None, url)).completions.create(model="tiny", prompt=PROMPT, **CASES[0]).choices[0].text

    first = ingress.serving
    assert len(first) == 2
    assert [complete() for _ in range(3)] == [expected.text] * 3
    os.kill(first[0], signal.SIGKILL)
    assert [complete() for _ in range(3)] == [expected.text] * 3  # the other one serves meanwhile
    restarted = wait_until(lambda: len(ingress.serving) == 2 and first[0] not in ingress.serving
                           and ingress.serving, timeout_s=60)
    assert first[1] in restarted
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        samples = {s.name + str(s.labels): s.value
                   for family in text_string_to_metric_families(response.read().decode()) for s in family.samples}
    # Every replica's requests, the killed one's included, whichever replica answers the scrape.
    assert samples["tandem:request_success_total{'finished_reason': 'length'}"] == 6
    assert samples["tandem:generation_tokens_total{}"] == 6 * 12
    processes = [r.process for r in ingress.replicas]
    ingress.close()
    assert all(p.returncode is not None for p in processes) and not ingress.state_dir.exists()


def test_an_ingress_replica_that_cannot_reach_its_cluster_fails_the_start(ray_cluster):
    from tandem.deploy.ingress import IngressError, IngressReplicas

    ingress = IngressReplicas("no-such-cluster", ["x"], ("127.0.0.1", 0), 2, None,
                              ray_cluster.get_runtime_context().gcs_address)
    with pytest.raises(IngressError, match="HTTP ingress replica [01] exited with code 1 before serving"):
        ingress.start()
    assert ingress.pids == [] and not ingress.state_dir.exists()
