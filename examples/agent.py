"""A minimal agent that talks to keel with the official OpenAI SDK.

    python examples/agent.py --base-url http://127.0.0.1:8420/v1 --model smart

It makes a plain call and a streamed call and prints which target answered and how
many attempts keel needed (response headers x-keel-target / x-keel-attempts /
x-keel-fallback / x-keel-degraded). Nothing in it is keel-specific except the
optional x-keel-* request headers that attribute the calls to an agent, task and step.
"""

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default="http://127.0.0.1:8420/v1")
    p.add_argument("--model", default="smart", help="a keel route")
    p.add_argument("--api-key", default="sk-unused", help="the agent's key, when keel requires one")
    p.add_argument("--task", default="example-task-1")
    a = p.parse_args()

    # keel retries, falls back and degrades for you: keep the SDK's own retries off
    # so that a failure you see is one keel could not absorb.
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0)
    attribution = {"x-keel-agent": "example", "x-keel-task": a.task}

    raw = client.chat.completions.with_raw_response.create(
        model=a.model,
        messages=[{"role": "user", "content": "Say hello in five words."}],
        extra_headers={**attribution, "x-keel-step": "greet"},
    )
    reply = raw.parse()
    print("reply:", reply.choices[0].message.content)
    print("answered by", raw.headers.get("x-keel-target"), "after", raw.headers.get("x-keel-attempts"), "attempt(s);",
          "fallback:", raw.headers.get("x-keel-fallback"), "degraded:", raw.headers.get("x-keel-degraded"))

    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        stream=True,
        extra_headers={**attribution, "x-keel-step": "count"},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
