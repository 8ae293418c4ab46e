"""Drives keel with the real `openai` Python SDK and prints what the SDK saw as JSON.

Usage: sdk_client.py MODE BASE_URL [--model M] [--key K] [--header NAME=VALUE ...]
                     [--no-extra-body]
MODE: chat | stream | tools | tool_round_trip | stream_tools | embed | models

`chat` sends an unknown field through `extra_body` unless --no-extra-body is given.

The SDK's own retries are off (max_retries=0) so that every retry a test sees
is keel's. Exceptions are reported by class name, never swallowed silently.
"""

import argparse
import json
import sys

import openai


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def passed_headers(raw) -> dict:
    """keel's headers and those it passes on from the provider."""
    return {
        k: v
        for k, v in raw.headers.items()
        if k.startswith(("x-keel-", "x-ratelimit-")) or k in ("x-request-id", "openai-processing-ms")
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("base_url")
    p.add_argument("--model", default="smart")
    p.add_argument("--key", default="sk-no-key")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--max-retries", type=int, default=0)
    p.add_argument("--no-extra-body", action="store_true")
    a = p.parse_args()
    headers = dict(h.split("=", 1) for h in a.header)
    client = openai.OpenAI(
        base_url=a.base_url,
        api_key=a.key,
        max_retries=a.max_retries,
        timeout=a.timeout,
        default_headers=headers,
    )
    out = {"ok": False}
    try:
        if a.mode == "chat":
            raw = client.chat.completions.with_raw_response.create(
                model=a.model,
                messages=[{"role": "user", "content": "hello keel"}],
                extra_body=None if a.no_extra_body else {"keel_test_unknown_field": {"kept": True}},
            )
            c = raw.parse()
            out.update(
                content=c.choices[0].message.content,
                model=c.model,
                usage=c.usage.model_dump() if c.usage else None,
                headers=passed_headers(raw),
                request_id=c._request_id,
            )
        elif a.mode == "stream":
            raw = client.chat.completions.with_raw_response.create(
                model=a.model,
                messages=[{"role": "user", "content": "stream to me please"}],
                stream=True,
            )
            out["headers"] = passed_headers(raw)
            parts = []
            chunks = 0
            finish = None
            try:
                for chunk in raw.parse():
                    chunks += 1
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                        finish = chunk.choices[0].finish_reason or finish
            finally:
                out.update(content="".join(parts), chunks=chunks, finish_reason=finish)
        elif a.mode == "tools":
            c = client.chat.completions.create(
                model=a.model,
                messages=[{"role": "user", "content": "what is the weather in Paris"}],
                tools=[
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "description": "weather for a city",
                            "parameters": {
                                "type": "object",
                                "properties": {"city": {"type": "string"}},
                                "required": ["city"],
                            },
                        },
                    }
                ],
                response_format={"type": "text"},
            )
            m = c.choices[0].message
            out.update(
                finish_reason=c.choices[0].finish_reason,
                tool_calls=[
                    {"id": t.id, "name": t.function.name, "arguments": json.loads(t.function.arguments)}
                    for t in (m.tool_calls or [])
                ],
            )
        elif a.mode == "tool_round_trip":
            # The agent loop: the model calls the tool, the agent runs it and sends the
            # result back, the model answers.
            messages = [
                {"role": "system", "content": "use the tools"},
                {"role": "user", "content": "what is the weather in Paris"},
            ]
            first = client.chat.completions.create(model=a.model, messages=messages, tools=[WEATHER])
            m = first.choices[0].message
            messages.append(m.model_dump(exclude_none=True))
            for call in m.tool_calls or []:
                args = json.loads(call.function.arguments)
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": f"sunny in {args.get('city')}"})
            second = client.chat.completions.create(model=a.model, messages=messages, tools=[WEATHER])
            out.update(
                first_finish_reason=first.choices[0].finish_reason,
                tool_calls=[
                    {"id": t.id, "name": t.function.name, "arguments": json.loads(t.function.arguments)}
                    for t in (m.tool_calls or [])
                ],
                finish_reason=second.choices[0].finish_reason,
                content=second.choices[0].message.content,
                usage=[first.usage.model_dump(), second.usage.model_dump()],
            )
        elif a.mode == "stream_tools":
            stream = client.chat.completions.create(
                model=a.model,
                messages=[{"role": "user", "content": "what is the weather in Paris"}],
                tools=[WEATHER],
                stream=True,
            )
            calls = {}
            finish = None
            for chunk in stream:
                if not chunk.choices:
                    continue
                finish = chunk.choices[0].finish_reason or finish
                for d in chunk.choices[0].delta.tool_calls or []:
                    c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                    if d.id:
                        c["id"] = d.id
                    if d.function and d.function.name:
                        c["name"] = d.function.name
                    if d.function and d.function.arguments:
                        c["arguments"] += d.function.arguments
            out.update(
                finish_reason=finish,
                tool_calls=[
                    {"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])}
                    for _, c in sorted(calls.items())
                ],
            )
        elif a.mode == "embed":
            e = client.embeddings.create(model=a.model, input=["one", "two"])
            out.update(count=len(e.data), dim=len(e.data[0].embedding))
        elif a.mode == "models":
            out.update(models=[m.id for m in client.models.list()])
            out.update(retrieved=client.models.retrieve(out["models"][0]).id)
        else:
            print(f"unknown mode {a.mode}", file=sys.stderr)
            return 2
        out["ok"] = True
    except openai.APIStatusError as e:
        headers = passed_headers(e.response)
        headers.update({k: v for k, v in e.response.headers.items() if k in ("retry-after", "x-should-retry")})
        out.update(exception=type(e).__name__, status=e.status_code, message=str(e),
                   headers=headers, request_id=e.request_id)
    except openai.APIError as e:
        out.update(exception=type(e).__name__, message=str(e))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
