"""bf16 through the cluster: prepacked linears and the native decode-attention kernel run inside
the actors (one torch thread, the step loop's worker thread), the bf16 KV cache crosses the shm
transport, and each request's tokens equal the in-process engine's for the same request alone."""
from __future__ import annotations

import random

import pytest

from tandem.engine import LLM, SamplingParams, kernels
from tandem.engine.engine import EngineConfig
from tests.integration.conftest import assert_all_blocks_free


@pytest.fixture(scope="module")
def bf16_cluster(ray_cluster, tiny_llama_dir):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig

    group = InstanceGroup(1, EngineConfig(dtype="bfloat16", num_blocks=64, block_size=16), num_cpus=0.5)
    cluster = Cluster.launch(LaunchConfig(name="bf16", model_dir=str(tiny_llama_dir), mode="disaggregated",
                                          prefill=group, decode=group, transfer_backend="shm"),
                             timeout_s=120)
    yield cluster
    cluster.shutdown()


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the native kernel")
def test_bf16_requests_match_the_engine_alone(bf16_cluster, tiny_llama_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (5, 15, 16, 17, 40)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = LLM(tiny_llama_dir, dtype="bfloat16", num_blocks=64)
    client = bf16_cluster.client(timeout_s=120)
    for prompt in prompts:  # one at a time: the same batch shapes as the engine alone
        want = llm.generate([prompt], params)[0].token_ids
        assert client.generate(prompt, params).token_ids == want
    assert_all_blocks_free(bf16_cluster)
