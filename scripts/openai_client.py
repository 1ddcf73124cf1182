"""Asks the ragcake service a question through the official OpenAI Python client, whole and
streamed, and prints what came back as JSON (used by the compatibility test).

usage: openai_client.py BASE_URL QUESTION
"""

import json
import sys

import openai


def main() -> None:
    base_url, question = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(model="ragcake", messages=messages, max_tokens=24)
    pieces = []
    finish = None
    usage = None
    stream = client.chat.completions.create(
        model="ragcake",
        messages=messages,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.total_tokens
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        unknown_model = None
    except openai.NotFoundError as error:
        unknown_model = error.status_code
    print(
        json.dumps(
            {
                "content": whole.choices[0].message.content,
                "finish_reason": whole.choices[0].finish_reason,
                "completion_tokens": whole.usage.completion_tokens,
                "streamed": "".join(pieces),
                "stream_finish_reason": finish,
                "stream_total_tokens": usage,
                "models": [m.id for m in client.models.list()],
                "unknown_model_status": unknown_model,
            }
        )
    )


if __name__ == "__main__":
    main()
