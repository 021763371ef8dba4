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


def test_unknown_fields_inside_messages_and_parts_are_refused_by_name():
    error = refusal(messages=[{"role": "user", "content": "hi", "padding": "x" * 1000},
                              {"role": "user", "content": [{"type": "text", "text": "hi", "blob": [1] * 50}]}])
    assert error.message == ("Unrecognized request argument supplied: messages[0].padding, "
                             "messages[1].content[0].blob") and error.code == "unrecognized_argument"
    # What clients echo back from an earlier turn, with values that mean nothing, still passes.
    check_supported(ChatRequest(model="m", messages=[
        {"role": "assistant", "content": "ok", "tool_calls": [], "refusal": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"}, *MESSAGES]))
    assert "messages[0].tool_calls" in refusal(messages=[
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function"}]}]).message


@pytest.mark.parametrize("where, body", [
    ("messages[0].content", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
    ("messages[0].content[0].text", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}),
    ("metadata.k", {"metadata": {"k": "\ud83d"}}),
])
def test_a_lone_surrogate_anywhere_is_refused_naming_where(where, body):
    error = refusal(**body)
    assert error.param == where and error.code == "invalid_unicode"
    error.body()["error"]["message"].encode("utf-8")  # the refusal itself is text


@pytest.mark.parametrize("key", ["²", "1" * 5000, "-1", " 7", "1e3", "１"])
def test_logit_bias_keys_are_ascii_token_ids(key):
    with pytest.raises(ValidationError, match="logit_bias keys must be token ids"):
        ChatRequest(model="m", messages=MESSAGES, logit_bias={key: 1})


def test_tiny_temperatures_are_greedy_and_empty_stops_are_ignored():
    assert ChatRequest(model="m", messages=MESSAGES, temperature=1e-40).sampling_temperature == 0.0
    assert ChatRequest(model="m", messages=MESSAGES, temperature=1e-5).sampling_temperature == 1e-5
    assert ChatRequest(model="m", messages=MESSAGES, stop="").stops == []
    assert ChatRequest(model="m", messages=MESSAGES, stop=["", "\n"]).stops == ["\n"]


def test_an_unexpected_error_is_a_500_that_keeps_the_connection():
    """Starlette's own 500 re-raises, and uvicorn then closes the connection under the client's next request."""
    import asyncio

    from nightshift.serving.app import RequestContextMiddleware
    from nightshift.serving.metrics import ServingMetrics

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(RequestContextMiddleware(broken, ServingMetrics())(scope, receive, send))  # does not raise
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert b"server_error" in sent[1]["body"]
