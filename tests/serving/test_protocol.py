"""What the endpoint refuses, and how it words validation errors."""

import pytest
from pydantic import ValidationError

from nightshift.serving.protocol import ChatRequest, CompletionRequest, OpenAIError, check_supported, validation_message

MESSAGES = [{"role": "user", "content": "hi"}]


def refusal(**body) -> OpenAIError:
    req = ChatRequest(model="m", messages=body.pop("messages", MESSAGES), **body)
    with pytest.raises(OpenAIError) as refused:
        check_supported(req)
    assert refused.value.status == 400
    return refused.value


def test_unsupported_options_are_named_never_ignored():
    error = refusal(n=2, tools=[{"type": "function", "function": {"name": "f"}}])
    assert "n, tools" in error.message and error.code == "unsupported_option"
    assert "response_format" in refusal(response_format={"type": "json_object"}).message
    assert "Unrecognized request argument supplied: frobnicate" == refusal(frobnicate=True).message
    assert "image_url" in refusal(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).message


def test_neutral_values_of_unsupported_options_pass():
    check_supported(ChatRequest(model="m", messages=MESSAGES, n=1, tools=[], response_format={"type": "text"},
                                parallel_tool_calls=True, store=False))
    check_supported(CompletionRequest(model="m", prompt="x", best_of=1, echo=True, logprobs=3))
    with pytest.raises(OpenAIError, match="best_of"):
        check_supported(CompletionRequest(model="m", prompt="x", best_of=3))


def test_bounds_on_stops_bias_and_logprobs():
    with pytest.raises(ValidationError):
        ChatRequest(model="m", messages=MESSAGES, stop=["a", "b", "c", "d", "e"])
    with pytest.raises(ValidationError):
        ChatRequest(model="m", messages=MESSAGES, logit_bias={"abc": 1})
    with pytest.raises(ValidationError):
        ChatRequest(model="m", messages=MESSAGES, top_logprobs=21)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", logprobs=6)


def test_prompts_may_be_text_or_token_ids():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]


def test_validation_messages_name_the_parameter():
    try:
        ChatRequest(model="m", messages=MESSAGES, max_tokens="lots")
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
    assert param == "max_tokens" and "max_tokens" in message
    assert validation_message([{"type": "missing", "loc": ("body", "messages"), "msg": "x"}]) == (
        "Missing required parameter: 'messages'.", "messages")
    assert validation_message([{"type": "json_invalid", "loc": ("body", 5), "msg": "x"}])[1] is None
