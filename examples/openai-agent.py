"""A research agent written with the OpenAI Python SDK: one chat completion, then a streamed one
(with stream_options.include_usage, so the gateway can count its tokens), then a follow-up.

Through the gateway, either way, with no change to the agent's code:
- base-URL mode: OPENAI_BASE_URL=http://127.0.0.1:15080/openai/v1 and UAPK_CAPABILITY=<token>
  (sent as the x-uapk-capability header);
- explicit proxy: HTTPS_PROXY=http://agent:<token>@127.0.0.1:15080 and SSL_CERT_FILE=<gateway
  CA> (the SDK's httpx client reads both), OPENAI_BASE_URL left at the real API (or a test one).
The API key is the gateway's to inject (connector credentials); the agent never holds it.
A refusal is an openai.APIStatusError whose str() carries the gateway's decision, reason code
and audit record: "... deny: budget_exceeded: ... (record N)".
"""
import os
import sys

import openai

capability = os.environ.get("UAPK_CAPABILITY")
client = openai.OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY", "injected-by-the-gateway"),
    default_headers={"x-uapk-capability": capability} if capability else None,
)
model = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
history = [{"role": "user", "content": "What is the capital of France?"}]

try:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=history)
    reply = raw.parse()
    answer = reply.choices[0].message.content
    print("chat", "record", raw.headers.get("x-uapk-record"), "tokens", reply.usage.total_tokens, answer)
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Which river flows through it?"}]

    stream = client.chat.completions.create(
        model=model, messages=history, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    print("stream", "tokens", usage.total_tokens if usage else None, text)
    history += [{"role": "assistant", "content": text}, {"role": "user", "content": "Summarise both answers."}]

    reply = client.chat.completions.create(model=model, messages=history)
    print("followup", "tokens", reply.usage.total_tokens, reply.choices[0].message.content)
except openai.APIStatusError as e:
    # The gateway refused (403 deny/escalate, 429 rate limit, 407 no identity): say why.
    print("refused:", str(e))
    sys.exit(0 if e.status_code in (403, 429) else 1)
