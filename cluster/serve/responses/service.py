"""Create, stream, retrieve and delete responses on top of the chat path of an OpenAIServer.

A create is the chat request conversation.chat_request builds (so the prompt, the grammar of
`text.format` or a forced tool call, and the served tool-call format are the chat route's), run as
one engine request; its answer becomes output items: a `message` with the text, one `function_call`
per call. Streaming sends the Responses event sequence: response.created, response.in_progress, per
item output_item.added / content_part.added / output_text.delta... / output_text.done /
content_part.done / output_item.done (function calls: output_item.added,
function_call_arguments.delta, .done, output_item.done), then response.completed (or
response.incomplete when max_output_tokens cut it, response.failed on an error), every event with
its sequence_number. The first engine output is awaited before the 200, so a request the engine
refuses still gets a 4xx.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response

from cluster.serve import openai_protocol as p
from cluster.serve.errors import InvalidRequest, NotFound, as_api_error
from cluster.serve.openai_params import chat_logprobs
from cluster.serve.responses.conversation import chat_request, input_messages, output_messages
from cluster.serve.responses.protocol import (FunctionCall, IncompleteDetails, InputTokensDetails, OutputMessage,
                                              OutputText, ResponseError, ResponseObject, ResponsesRequest, Usage)
from cluster.serve.responses.store import ResponseStore
from cluster.serve.streaming import ClosingStreamingResponse
from cluster.serve.tools.parsing import StreamingToolParser


class ResponseNotFound(NotFound):
    type = "invalid_request_error"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(f"Response with id '{response_id}' not found (responses are kept in the memory of the "
                         "replica that made them, within server.responses_max_stored)", param=param)


class ResponsesService:
    def __init__(self, server: Any, store: ResponseStore) -> None:
        self.server = server  # cluster.serve.openai_server.OpenAIServer
        self.store = store

    # ------------------------------------------------------------------------------ routes

    async def create(self, req: ResponsesRequest, arrival: float | None = None) -> Response:
        """`arrival`: when the request reached this replica (where its latency metrics start)."""
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            prev = self.store.get(req.previous_response_id)
            if prev is None:
                raise ResponseNotFound(req.previous_response_id, param="previous_response_id")
            history = prev.history
        chat = chat_request(req, history)
        choices, k, tools = await self.server.chat_plan(chat)
        response = ResponseObject(
            model=self.server.model.name, instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            max_tool_calls=req.max_tool_calls, parallel_tool_calls=req.parallel_tool_calls,
            previous_response_id=req.previous_response_id, temperature=req.temperature, top_p=req.top_p,
            top_logprobs=req.top_logprobs, tool_choice=_echo(req.tool_choice, "auto"),
            tools=[t.model_dump(exclude_none=True) for t in req.function_tools()],
            text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else
            {"format": {"type": "text"}}, store=req.store, metadata=req.metadata or {}, user=req.user,
        )
        turn = _Turn(self, req, response, chat, k, tools, history + input_messages(req.input))
        if req.stream:
            return await turn.stream(self.server.outputs(response.id, choices), len(choices[0].prompt_ids), arrival)
        (result,) = await self.server.collect(response.id, choices, arrival)
        turn.finish(result.text, result.finish_reason, len(choices[0].prompt_ids), len(result.token_ids),
                    result.cached_tokens, result.logprobs)
        return JSONResponse(response.model_dump(mode="json"))

    def retrieve(self, response_id: str) -> Response:
        stored = self.store.get(response_id)
        if stored is None:
            raise ResponseNotFound(response_id)
        return JSONResponse(stored.response.model_dump(mode="json"))

    def delete(self, response_id: str) -> Response:
        if not self.store.delete(response_id):
            raise ResponseNotFound(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    def cancel(self, response_id: str) -> Response:
        if self.store.get(response_id) is None:
            raise ResponseNotFound(response_id)
        raise InvalidRequest("Only background responses can be cancelled, and this server runs none", param="response_id")


def _echo(value: Any, default: Any) -> Any:
    if value is None:
        return default
    return value.model_dump() if hasattr(value, "model_dump") else value


class _Turn:
    """One response being made: its output items, and what to store at the end."""

    def __init__(self, service: ResponsesService, req: ResponsesRequest, response: ResponseObject,
                 chat: p.ChatCompletionRequest, k: int | None, tools: set[str] | None,
                 conversation: list[dict[str, Any]]) -> None:
        self.service, self.req, self.response, self.chat = service, req, response, chat
        self.k, self.tools, self.conversation = k, tools, conversation
        self.max_calls = req.max_tool_calls

    def _logprobs(self, entries: list) -> list[dict[str, Any]]:
        if self.k is None or not entries:
            return []
        lps = chat_logprobs(entries, self.service.server._token_text(), self.k)
        return [e.model_dump(mode="json") for e in lps.content or []]

    def _calls(self, calls: list) -> list[FunctionCall]:
        out = [FunctionCall(call_id=c.id, name=c.name, arguments=c.arguments) for c in calls]
        return out[: self.max_calls] if self.max_calls is not None else out

    def finish(self, text: str, finish_reason: str | None, prompt: int, completion: int, cached: int,
               logprobs: list) -> None:
        """The whole answer -> output items, status, usage; stored if asked."""
        content, calls = self.service.server.tool_calls(text, self.tools, self.chat.calls_parallel)
        items: list[OutputMessage | FunctionCall] = []
        if content or not calls:
            items.append(OutputMessage(content=[OutputText(text=content or "", logprobs=self._logprobs(logprobs))]))
        items += self._calls(calls)
        self.response.output = items
        self._close(finish_reason, prompt, completion, cached, count=False)  # collect() counted them

    def _close(self, finish_reason: str | None, prompt: int, completion: int, cached: int, count: bool = True) -> None:
        r = self.response
        r.usage = Usage(input_tokens=prompt, input_tokens_details=InputTokensDetails(cached_tokens=cached),
                        output_tokens=completion, total_tokens=prompt + completion)
        if finish_reason == "length":
            r.status, r.incomplete_details = "incomplete", IncompleteDetails(reason="max_output_tokens")
            for item in r.output:
                item.status = "incomplete"
        else:
            r.status = "completed"
        if count:
            self.service.server.metrics.count_tokens(prompt, completion)
        if self.req.store:
            self.service.store.put(r, self.conversation + output_messages(r.output))

    # ------------------------------------------------------------------------------ streaming

    async def stream(self, outputs: AsyncIterator[tuple[int, Any]], prompt: int, arrival: float | None) -> Response:
        try:
            first = await anext(outputs, None)
        except BaseException:
            await outputs.aclose()
            raise
        return ClosingStreamingResponse(self._events(outputs, first, prompt, arrival), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})

    async def _events(self, outputs: AsyncIterator[tuple[int, Any]], first: Any, prompt: int,
                      arrival: float | None) -> AsyncIterator[bytes]:
        sse = _Events()
        r = self.response
        parser = StreamingToolParser(self.tools, self.service.server.tool_format, self.chat.calls_parallel) \
            if self.tools is not None else None
        message: _OpenMessage | None = None
        pending = ""  # whitespace before anything else: kept unless calls are all there is
        completion, cached, finish = 0, 0, None
        timer = self.service.server.metrics.request_timer(arrival)
        failed = False
        try:
            yield sse("response.created", response=r.model_dump(mode="json"))
            yield sse("response.in_progress", response=r.model_dump(mode="json"))
            item = first
            while item is not None:
                _, out = item
                completion += len(out.new_token_ids)
                timer.observe(out)
                cached = getattr(out, "cached_tokens", 0)
                text, calls = out.new_text, []
                if parser is not None:
                    text, calls = parser.feed(out.new_text)
                    if out.finished:
                        rest, more = parser.finish()
                        text, calls = text + rest, calls + more
                if message is None and not text.strip():
                    pending += text
                    text = ""
                if text:
                    if message is None:
                        message = _OpenMessage(len(r.output))
                        r.output.append(message.item)
                        for ev in message.open(sse):
                            yield ev
                        text, pending = pending + text, ""
                    yield message.delta(sse, text, self._logprobs(getattr(out, "logprobs", None) or []))
                for _, parsed in calls:
                    if self.max_calls is not None and sum(isinstance(i, FunctionCall) for i in r.output) >= self.max_calls:
                        break
                    call = FunctionCall(call_id=parsed.id, name=parsed.name, arguments=parsed.arguments)
                    if message is not None:
                        for ev in message.close(sse):
                            yield ev
                        message = None
                    for ev in _call_events(sse, call, len(r.output)):
                        yield ev
                    r.output.append(call)
                if out.finished:
                    finish = out.finish_reason
                item = await anext(outputs, None)
            if message is None and not r.output:  # an empty answer is still one message
                message = _OpenMessage(0)
                r.output.append(message.item)
                for ev in message.open(sse):
                    yield ev
                if pending:
                    yield message.delta(sse, pending, [])
            if message is not None:
                for ev in message.close(sse):
                    yield ev
            self._close(finish, prompt, completion, cached)
            kind = "response.incomplete" if r.status == "incomplete" else "response.completed"
            yield sse(kind, response=r.model_dump(mode="json"))
        except Exception as exc:  # the stream has started: report in-band, then end it
            failed = True
            err = as_api_error(exc)
            self.service.server.metrics.count_stream_error(err.status)
            r.status, r.error = "failed", ResponseError(code=err.code or err.type, message=err.message)
            yield sse("error", code=err.code or err.type, message=err.message, param=err.param)
            yield sse("response.failed", response=r.model_dump(mode="json"))
        finally:
            await outputs.aclose()
            timer.close(error=failed)  # a client gone mid-stream ends here too


class _Events:
    """Server-sent events as the Responses API sends them: named, numbered in order."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {kind}\n".encode() + p.sse_event(body)


class _OpenMessage:
    def __init__(self, index: int) -> None:
        self.index = index
        self.item = OutputMessage(status="in_progress")
        self.text = ""
        self.logprobs: list = []

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self.item.id, "output_index": self.index, "content_index": 0}

    def open(self, sse: _Events) -> list[bytes]:
        return [sse("response.output_item.added", output_index=self.index, item=self.item.model_dump(mode="json")),
                sse("response.content_part.added", **self._ids(),
                    part=OutputText(text="").model_dump(mode="json"))]

    def delta(self, sse: _Events, text: str, logprobs: list) -> bytes:
        self.text += text
        self.logprobs += logprobs
        return sse("response.output_text.delta", **self._ids(), delta=text, logprobs=logprobs)

    def close(self, sse: _Events) -> list[bytes]:
        part = OutputText(text=self.text, logprobs=self.logprobs)
        self.item.content, self.item.status = [part], "completed"
        return [sse("response.output_text.done", **self._ids(), text=self.text, logprobs=self.logprobs),
                sse("response.content_part.done", **self._ids(), part=part.model_dump(mode="json")),
                sse("response.output_item.done", output_index=self.index, item=self.item.model_dump(mode="json"))]


def _call_events(sse: _Events, call: FunctionCall, index: int) -> list[bytes]:
    opened = call.model_copy(update={"arguments": "", "status": "in_progress"})
    ids = {"item_id": call.id, "output_index": index}
    return [sse("response.output_item.added", output_index=index, item=opened.model_dump(mode="json")),
            sse("response.function_call_arguments.delta", **ids, delta=call.arguments),
            sse("response.function_call_arguments.done", **ids, name=call.name, arguments=call.arguments),
            sse("response.output_item.done", output_index=index, item=call.model_dump(mode="json"))]
