"""Run as a job's agent by tests/local/llm.rs: the official openai SDK, configured only by the job's
environment (OPENAI_BASE_URL, OPENAI_API_KEY), calls the OATS gateway without and with streaming,
then spends until the gateway refuses with insufficient_quota. Exit 0 when all of that held."""

import os
import sys

import openai

client = openai.OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY, as agents do
messages = [{"role": "user", "content": "hello"}]

answer = client.chat.completions.create(model="test-model", messages=messages)
print(f"non-streamed: {answer.choices[0].message.content}", flush=True)

parts = []
for chunk in client.chat.completions.create(model="test-model", messages=messages, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
print(f"streamed: {''.join(parts)}", flush=True)

for call in range(100):
    try:
        client.chat.completions.create(model="test-model", messages=messages, max_tokens=300)
    except openai.RateLimitError as error:
        code = error.body.get("code") if isinstance(error.body, dict) else None
        print(f"refused: {code}", flush=True)
        with open(os.environ["OATS_RESULT_FILE"], "w") as result:
            result.write(f"refused after {call} spending calls")
        sys.exit(0 if code == "insufficient_quota" else 1)
print("never refused", flush=True)
sys.exit(1)
