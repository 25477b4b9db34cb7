import json

import pytest

from tandem.engine.config import UnsupportedModelError, load_config, parse_config

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_classic_and_transformers5_rope_forms_agree():
    classic = parse_config({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3})
    new = parse_config({**BASE, "rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    assert classic == new
    assert classic.rope_theta == 5e5 and classic.rope_scaling.factor == 8.0
    assert classic.head_dim == 16 and classic.num_kv_heads == 2


def test_architecture_specifics():
    qwen = parse_config({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen.qkv_bias and not qwen.o_bias
    assert not parse_config(BASE).qkv_bias
    # converted checkpoints sometimes lack `architectures`
    assert parse_config({**{k: v for k, v in BASE.items() if k != "architectures"},
                         "model_type": "mistral"}).architecture == "MistralForCausalLM"


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        parse_config({**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        parse_config({**BASE, "rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_load_config_errors_and_generation_eos(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_config(tmp_path).eos_token_ids == (2, 7)
    del_hidden = {k: v for k, v in BASE.items() if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(del_hidden))
    with pytest.raises(ValueError, match="hidden_size"):
        load_config(tmp_path)
