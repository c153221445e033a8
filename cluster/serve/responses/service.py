"""Create, stream, retrieve and delete responses on top of the chat path of an OpenAIServer, as the
server half's pieces (cluster/serve/ingress/pieces.py) like every other route.

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

The response's id, its creation time and its message items' ids come from the request's context,
so a stream resumed on another replica after its replica died (cluster/serve/ingress/resume.py)
replays what its client has into the same state and goes on with the same ids and numbering. The
store is this replica's memory: a resumed response is stored by the replica that finished it.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from cluster.serve import openai_protocol as p
from cluster.serve.errors import APIError, InvalidRequest, NotFound
from cluster.serve.ingress.pieces import Piece, RequestContext, json_piece
from cluster.serve.openai_params import chat_logprobs
from cluster.serve.responses.conversation import chat_request, input_messages, output_messages
from cluster.serve.responses.protocol import (FunctionCall, IncompleteDetails, InputTokensDetails, OutputMessage,
                                              OutputText, ResponseError, ResponseObject, ResponseRef,
                                              ResponsesRequest, Usage)
from cluster.serve.responses.store import ResponseStore
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

    async def create(self, req: ResponsesRequest, ctx: RequestContext) -> AsyncIterator[Piece]:
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            prev = self.store.get(req.previous_response_id)
            if prev is None:
                raise ResponseNotFound(req.previous_response_id, param="previous_response_id")
            history = prev.history
        chat = chat_request(req, history)
        choices, k, tools = await self.server.chat_plan(chat, ctx)
        response = ResponseObject(
            id="resp_" + ctx.id_suffix, created_at=ctx.created,
            model=self.server.model.name, instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            max_tool_calls=req.max_tool_calls, parallel_tool_calls=req.parallel_tool_calls,
            previous_response_id=req.previous_response_id, temperature=req.temperature, top_p=req.top_p,
            top_logprobs=req.top_logprobs, tool_choice=_echo(req.tool_choice, "auto"),
            tools=[t.model_dump(exclude_none=True) for t in req.function_tools()],
            text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else
            {"format": {"type": "text"}}, store=req.store, metadata=req.metadata or {}, user=req.user,
        )
        turn = _Turn(self, req, response, chat, k, tools, history + input_messages(req.input), choices)
        if req.stream:
            async for piece in self.server.stream_events(response.id, choices, turn, ctx):
                yield piece
            return
        results: list = []
        async for piece in self.server.collect_pieces(response.id, choices, ctx, results):
            yield piece
        (result,) = results
        turn.finish(result.text, result.finish_reason, len(choices[0].prompt_ids), len(result.token_ids),
                    result.cached_tokens, result.logprobs)
        yield json_piece(response)

    async def retrieve(self, ref: ResponseRef, ctx: RequestContext) -> AsyncIterator[Piece]:
        stored = self.store.get(ref.response_id)
        if stored is None:
            raise ResponseNotFound(ref.response_id)
        yield json_piece(stored.response)

    async def delete(self, ref: ResponseRef, ctx: RequestContext) -> AsyncIterator[Piece]:
        if not self.store.delete(ref.response_id):
            raise ResponseNotFound(ref.response_id)
        yield json_piece({"id": ref.response_id, "object": "response", "deleted": True})

    async def cancel(self, ref: ResponseRef, ctx: RequestContext) -> AsyncIterator[Piece]:
        if self.store.get(ref.response_id) is None:
            raise ResponseNotFound(ref.response_id)
        raise InvalidRequest("Only background responses can be cancelled, and this server runs none", param="response_id")
        yield  # an async generator like the other routes


def _echo(value: Any, default: Any) -> Any:
    if value is None:
        return default
    return value.model_dump() if hasattr(value, "model_dump") else value


class _Turn:
    """One response being made: its output items, and what to store at the end. As a stream's
    events (openai_server.StreamEvents): opening, per engine output, end, error."""

    def __init__(self, service: ResponsesService, req: ResponsesRequest, response: ResponseObject,
                 chat: p.ChatCompletionRequest, k: int | None, tools: set[str] | None,
                 conversation: list[dict[str, Any]], choices: list) -> None:
        self.service, self.req, self.response, self.chat = service, req, response, chat
        self.k, self.tools, self.conversation = k, tools, conversation
        self.max_calls = req.max_tool_calls
        self.prompt = len(choices[0].prompt_ids)
        # streaming state
        self.sse = _Events()
        self.parser = StreamingToolParser(tools, service.server.tool_format, chat.calls_parallel) \
            if tools is not None else None
        self.message: _OpenMessage | None = None
        self.pending = ""  # whitespace before anything else: kept unless calls are all there is

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
            items.append(OutputMessage(id=self._message_id(0),
                                       content=[OutputText(text=content or "", logprobs=self._logprobs(logprobs))]))
        items += self._calls(calls)
        self.response.output = items
        self._close(finish_reason, prompt, completion, cached)

    def _message_id(self, index: int) -> str:
        return f"msg_{self.response.id[5:]}{index:04x}"

    def _close(self, finish_reason: str | None, prompt: int, completion: int, cached: int) -> None:
        """Status, usage and the store (the server half counted the tokens)."""
        r = self.response
        r.usage = Usage(input_tokens=prompt, input_tokens_details=InputTokensDetails(cached_tokens=cached),
                        output_tokens=completion, total_tokens=prompt + completion)
        if finish_reason == "length":
            r.status, r.incomplete_details = "incomplete", IncompleteDetails(reason="max_output_tokens")
            for item in r.output:
                item.status = "incomplete"
        else:
            r.status = "completed"
        if self.req.store:
            self.service.store.put(r, self.conversation + output_messages(r.output))

    # ------------------------------------------------------------------------------ streaming

    def opening(self) -> bytes:
        r = self.response.model_dump(mode="json")
        return self.sse("response.created", response=r) + self.sse("response.in_progress", response=r)

    def delta(self, index: int, out: Any, results: list) -> bytes:
        r, sse = self.response, self.sse
        data = bytearray()
        text, calls = out.new_text, []
        if self.parser is not None:
            text, calls = self.parser.feed(out.new_text)
            if out.finished:
                rest, more = self.parser.finish()
                text, calls = text + rest, calls + more
        if self.message is None and not text.strip():
            self.pending += text
            text = ""
        if text:
            if self.message is None:
                self.message = _OpenMessage(len(r.output), self._message_id(len(r.output)))
                r.output.append(self.message.item)
                data += self.message.open(sse)
                text, self.pending = self.pending + text, ""
            data += self.message.delta(sse, text, self._logprobs(getattr(out, "logprobs", None) or []))
        for _, parsed in calls:
            if self.max_calls is not None and sum(isinstance(i, FunctionCall) for i in r.output) >= self.max_calls:
                break
            call = FunctionCall(id=f"fc_{r.id[5:]}{len(r.output):04x}", call_id=parsed.id, name=parsed.name,
                                arguments=parsed.arguments)
            if self.message is not None:
                data += self.message.close(sse)
                self.message = None
            data += _call_events(sse, call, len(r.output))
            r.output.append(call)
        return bytes(data)

    def end(self, results: list) -> bytes:
        r, sse = self.response, self.sse
        data = bytearray()
        if self.message is None and not r.output:  # an empty answer is still one message
            self.message = _OpenMessage(0, self._message_id(0))
            r.output.append(self.message.item)
            data += self.message.open(sse)
            if self.pending:
                data += self.message.delta(sse, self.pending, [])
        if self.message is not None:
            data += self.message.close(sse)
        (result,) = results
        self._close(result.finish_reason, self.prompt, len(result.token_ids), result.cached_tokens)
        kind = "response.incomplete" if r.status == "incomplete" else "response.completed"
        return bytes(data + sse(kind, response=r.model_dump(mode="json")))

    def error(self, err: APIError) -> bytes:
        r = self.response
        r.status, r.error = "failed", ResponseError(code=err.code or err.type, message=err.message)
        return (self.sse("error", code=err.code or err.type, message=err.message, param=err.param)
                + self.sse("response.failed", response=r.model_dump(mode="json")))


class _Events:
    """Server-sent events as the Responses API sends them: named, numbered in order."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {kind}\n".encode() + p.sse_event(body)


class _OpenMessage:
    def __init__(self, index: int, item_id: str) -> None:
        self.index = index
        self.item = OutputMessage(id=item_id, status="in_progress")
        self.text = ""
        self.logprobs: list = []

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self.item.id, "output_index": self.index, "content_index": 0}

    def open(self, sse: _Events) -> bytes:
        return (sse("response.output_item.added", output_index=self.index, item=self.item.model_dump(mode="json"))
                + sse("response.content_part.added", **self._ids(), part=OutputText(text="").model_dump(mode="json")))

    def delta(self, sse: _Events, text: str, logprobs: list) -> bytes:
        self.text += text
        self.logprobs += logprobs
        return sse("response.output_text.delta", **self._ids(), delta=text, logprobs=logprobs)

    def close(self, sse: _Events) -> bytes:
        part = OutputText(text=self.text, logprobs=self.logprobs)
        self.item.content, self.item.status = [part], "completed"
        return (sse("response.output_text.done", **self._ids(), text=self.text, logprobs=self.logprobs)
                + sse("response.content_part.done", **self._ids(), part=part.model_dump(mode="json"))
                + sse("response.output_item.done", output_index=self.index, item=self.item.model_dump(mode="json")))


def _call_events(sse: _Events, call: FunctionCall, index: int) -> bytes:
    opened = call.model_copy(update={"arguments": "", "status": "in_progress"})
    ids = {"item_id": call.id, "output_index": index}
    return (sse("response.output_item.added", output_index=index, item=opened.model_dump(mode="json"))
            + sse("response.function_call_arguments.delta", **ids, delta=call.arguments)
            + sse("response.function_call_arguments.done", **ids, name=call.name, arguments=call.arguments)
            + sse("response.output_item.done", output_index=index, item=call.model_dump(mode="json")))
