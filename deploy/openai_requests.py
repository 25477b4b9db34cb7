"""OpenAI request bodies -> tandem requests: which fields map onto ``SamplingParams``, which are
refused (by name: tandem never ignores a field it does not support), and OpenAI's error shape.

Completions (``/v1/completions``) and chat (``/v1/chat/completions``) share the sampling fields;
a completion's prompt is text or token ids (one prompt: ``n`` and batches of prompts are refused),
a chat's messages are rendered with the model's chat template. No HTTP framework here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.engine.params import MAX_TOP_LOGPROBS, SamplingParams

# Fields tandem does not implement, with the one value that means "not used".
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logit_bias": None,
                "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1,
                "tools": None, "tool_choice": None, "functions": None, "function_call": None,
                "response_format": None, "parallel_tool_calls": None, "min_tokens": 0,
                "prompt_logprobs": None, "top_logprobs": None}
_ACCEPTED = {"model", "stream", "stream_options", "user", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stop_token_ids"}
_NOT_USED_ALSO: dict[str, tuple] = {}


class OpenAIError(Exception):
    """An error as OpenAI's API returns it: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Parsed:
    """One request, ready for the router."""

    model: str
    prompt: str | list[int] | list[dict]  # text, token ids, or a chat's messages
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion(body: Any, default_max_tokens: int = 16) -> Parsed:
    body = _mapping(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise OpenAIError(400, "prompt: a batch of prompts is not supported; send one per request",
                          "prompt")
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, list)
                                              and not all(_is_int(t) for t in prompt)):
        raise OpenAIError(400, "prompt: expected a string or a list of token ids", "prompt")
    return _parsed(body, {"prompt", "logprobs"}, prompt, default_max_tokens, _completion_logprobs(body))


def _completion_logprobs(body: dict) -> dict[str, Any]:
    """Completions' ``logprobs``: the number of most likely tokens to list at each step (0: the
    chosen token's log-probability alone), or null for none."""
    value = body.get("logprobs")
    if value is None:
        return {}
    if not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise OpenAIError(400, f"logprobs: expected an integer from 0 to {MAX_TOP_LOGPROBS} or null, "
                               f"got {value!r}", "logprobs")
    return {"logprobs": True, "top_logprobs": value}


def _chat_logprobs(body: dict) -> dict[str, Any]:
    """Chat's ``logprobs`` (a boolean) and ``top_logprobs`` (how many most likely tokens, which
    needs logprobs: true)."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise OpenAIError(400, f"logprobs: expected a boolean, got {wanted!r}", "logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise OpenAIError(400, f"top_logprobs: expected an integer from 0 to {MAX_TOP_LOGPROBS}, "
                               f"got {top!r}", "top_logprobs")
    if top and not wanted:
        raise OpenAIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    return {"logprobs": True, "top_logprobs": top or 0} if wanted else {}


def parse_chat(body: Any, default_max_tokens: int) -> Parsed:
    """A chat request; its ``prompt`` is the messages (role and content), for the router to
    render with the model's chat template."""
    body = _mapping(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages: expected a non-empty list of messages", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OpenAIError(400, f"messages[{i}]: expected an object with a role", f"messages[{i}]")
        if not isinstance(message.get("content"), str):
            raise OpenAIError(400, f"messages[{i}].content: only text content is supported",
                              f"messages[{i}].content")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
    return _parsed(body, {"messages", "logprobs", "top_logprobs"}, prompt, default_max_tokens,
                   _chat_logprobs(body))


def _parsed(body: dict, own: set[str], prompt, default_max_tokens: int,
            logprobs: dict[str, Any]) -> Parsed:
    _refuse_unsupported(body, own)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model: required, the name of a served model", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "stream: expected a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise OpenAIError(400, "stream_options: only include_usage is supported", "stream_options")
    if options and not stream:
        raise OpenAIError(400, "stream_options: only allowed with stream: true", "stream_options")
    return Parsed(model, prompt, _sampling(body, default_max_tokens, logprobs), stream,
                  bool(options.get("include_usage", False)))


def _sampling(body: dict, default_max_tokens: int, logprobs: dict[str, Any]) -> SamplingParams:
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise OpenAIError(400, "max_tokens: give max_tokens or max_completion_tokens, not both", "max_tokens")
    fields = {"max_tokens": _first(body, "max_completion_tokens", "max_tokens", default_max_tokens), **logprobs}
    for name in ("temperature", "top_p", "top_k", "seed", "ignore_eos"):
        if body.get(name) is not None:
            fields[name] = body[name]
    if isinstance(fields.get("temperature"), int) and not isinstance(fields["temperature"], bool):
        fields["temperature"] = float(fields["temperature"])  # JSON has one number type
    if isinstance(fields.get("top_p"), int) and not isinstance(fields["top_p"], bool):
        fields["top_p"] = float(fields["top_p"])
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = tuple(stop) if isinstance(stop, list) else stop
    if body.get("stop_token_ids") is not None:
        fields["stop_token_ids"] = tuple(body["stop_token_ids"]) if isinstance(body["stop_token_ids"], list) \
            else body["stop_token_ids"]
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as exc:
        message = str(exc).removeprefix("invalid SamplingParams: ")
        raise OpenAIError(400, message, message.split(":", 1)[0]) from None


def _refuse_unsupported(body: dict, own: set[str]) -> None:
    for name, value in body.items():
        if name in own or name in _ACCEPTED:
            continue
        if name not in _UNSUPPORTED:
            raise OpenAIError(400, f"{name}: unknown field", name)
        if value is not None and value != _UNSUPPORTED[name] and value not in _NOT_USED_ALSO.get(name, ()):
            raise OpenAIError(400, f"{name}: not supported by tandem (got {value!r})", name)


def _first(body: dict, *names_then_default):
    *names, default = names_then_default
    for name in names:
        if body.get(name) is not None:
            return body[name]
    return default


def _mapping(body: Any) -> dict:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
