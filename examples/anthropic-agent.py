"""A research agent written with the Anthropic Python SDK: one message, then a streamed one,
then a follow-up.

Through the gateway, either way, with no change to the agent's code:
- base-URL mode: ANTHROPIC_BASE_URL=http://127.0.0.1:15080/anthropic and UAPK_CAPABILITY=<token>
  (sent as the x-uapk-capability header);
- explicit proxy: HTTPS_PROXY=http://agent:<token>@127.0.0.1:15080 and SSL_CERT_FILE=<gateway
  CA> (the SDK's httpx client reads both), ANTHROPIC_BASE_URL left at the real API (or a test one).
The API key is the gateway's to inject (connector credentials); the agent never holds it.
A refusal is an anthropic.APIStatusError whose str() carries the gateway's decision, reason
code and audit record: "... deny: budget_exceeded: ... (record N)".
"""
import os
import sys

import anthropic

capability = os.environ.get("UAPK_CAPABILITY")
client = anthropic.Anthropic(
    api_key=os.environ.get("ANTHROPIC_API_KEY", "injected-by-the-gateway"),
    default_headers={"x-uapk-capability": capability} if capability else None,
)
model = os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5")
history = [{"role": "user", "content": "What is the capital of France?"}]

try:
    raw = client.messages.with_raw_response.create(model=model, max_tokens=256, messages=history)
    reply = raw.parse()
    answer = "".join(b.text for b in reply.content if b.type == "text")
    tokens = reply.usage.input_tokens + reply.usage.output_tokens
    print("chat", "record", raw.headers.get("x-uapk-record"), "tokens", tokens, answer)
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Which river flows through it?"}]

    with client.messages.stream(model=model, max_tokens=256, messages=history) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    print("stream", "tokens", final.usage.input_tokens + final.usage.output_tokens, text)
    history += [{"role": "assistant", "content": text}, {"role": "user", "content": "Summarise both answers."}]

    reply = client.messages.create(model=model, max_tokens=256, messages=history)
    print("followup", "tokens", reply.usage.input_tokens + reply.usage.output_tokens, reply.content[0].text)
except anthropic.APIStatusError as e:
    # The gateway refused (403 deny/escalate, 429 rate limit, 407 no identity): say why.
    print("refused:", str(e))
    sys.exit(0 if e.status_code in (403, 429) else 1)
