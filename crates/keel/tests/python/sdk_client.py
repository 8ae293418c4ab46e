"""Drives keel with the real `openai` Python SDK and prints what the SDK saw as JSON.

Usage: sdk_client.py MODE BASE_URL [--model M] [--key K] [--header NAME=VALUE ...]
MODE: chat | stream | tools | embed | models

The SDK's own retries are off (max_retries=0) so that every retry a test sees
is keel's. Exceptions are reported by class name, never swallowed silently.
"""

import argparse
import json
import sys

import openai


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("base_url")
    p.add_argument("--model", default="smart")
    p.add_argument("--key", default="sk-no-key")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args()
    headers = dict(h.split("=", 1) for h in a.header)
    client = openai.OpenAI(
        base_url=a.base_url,
        api_key=a.key,
        max_retries=0,
        timeout=a.timeout,
        default_headers=headers,
    )
    out = {"ok": False}
    try:
        if a.mode == "chat":
            raw = client.chat.completions.with_raw_response.create(
                model=a.model,
                messages=[{"role": "user", "content": "hello keel"}],
                extra_body={"keel_test_unknown_field": {"kept": True}},
            )
            c = raw.parse()
            out.update(
                content=c.choices[0].message.content,
                model=c.model,
                usage=c.usage.model_dump() if c.usage else None,
                headers={k: v for k, v in raw.headers.items() if k.startswith("x-keel-")},
            )
        elif a.mode == "stream":
            raw = client.chat.completions.with_raw_response.create(
                model=a.model,
                messages=[{"role": "user", "content": "stream to me please"}],
                stream=True,
            )
            out["headers"] = {k: v for k, v in raw.headers.items() if k.startswith("x-keel-")}
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
        elif a.mode == "embed":
            e = client.embeddings.create(model=a.model, input=["one", "two"])
            out.update(count=len(e.data), dim=len(e.data[0].embedding))
        elif a.mode == "models":
            out.update(models=[m.id for m in client.models.list()])
        else:
            print(f"unknown mode {a.mode}", file=sys.stderr)
            return 2
        out["ok"] = True
    except openai.APIStatusError as e:
        out.update(exception=type(e).__name__, status=e.status_code, message=str(e),
                   headers={k: v for k, v in e.response.headers.items() if k.startswith("x-keel-") or k == "retry-after"})
    except openai.APIError as e:
        out.update(exception=type(e).__name__, message=str(e))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
