// A research agent written with the OpenAI Node SDK: one chat completion, then a streamed one
// (with stream_options.include_usage, so the gateway can count its tokens), then a follow-up.
//
// Through the gateway, either way, with no change to the agent's code:
// - base-URL mode: OPENAI_BASE_URL=http://127.0.0.1:15080/openai/v1 and UAPK_CAPABILITY=<token>
//   (sent as the x-uapk-capability header);
// - explicit proxy: HTTPS_PROXY=http://agent:<token>@127.0.0.1:15080 and
//   NODE_EXTRA_CA_CERTS=<gateway CA>. The SDK uses fetch: Node >= 24 honours HTTPS_PROXY with
//   NODE_USE_ENV_PROXY=1; on older Node, undici's EnvHttpProxyAgent reads the same variables.
// The API key is the gateway's to inject (connector credentials); the agent never holds it.
// A refusal is an OpenAI.APIError whose message carries the gateway's decision, reason code and
// audit record: "403 deny: budget_exceeded: ... (record N)".
import OpenAI from "openai";
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";

const major = Number(process.versions.node.split(".")[0]);
if (major < 24 && (process.env.HTTPS_PROXY || process.env.https_proxy)) {
  setGlobalDispatcher(new EnvHttpProxyAgent());
}
const capability = process.env.UAPK_CAPABILITY;
const client = new OpenAI({
  apiKey: process.env.OPENAI_API_KEY ?? "injected-by-the-gateway",
  defaultHeaders: capability ? { "x-uapk-capability": capability } : undefined,
});
const model = process.env.OPENAI_MODEL ?? "gpt-4o-mini";
const history = [{ role: "user", content: "What is the capital of France?" }];

try {
  const { data: reply, response } = await client.chat.completions
    .create({ model, messages: history })
    .withResponse();
  const answer = reply.choices[0].message.content;
  console.log("chat", "record", response.headers.get("x-uapk-record"), "tokens", reply.usage.total_tokens, answer);
  history.push({ role: "assistant", content: answer }, { role: "user", content: "Which river flows through it?" });

  const stream = await client.chat.completions.create({
    model,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  console.log("stream", "tokens", usage?.total_tokens ?? null, text);
  history.push({ role: "assistant", content: text }, { role: "user", content: "Summarise both answers." });

  const followup = await client.chat.completions.create({ model, messages: history });
  console.log("followup", "tokens", followup.usage.total_tokens, followup.choices[0].message.content);
} catch (e) {
  if (!(e instanceof OpenAI.APIError) || e.status === undefined) throw e;
  // The gateway refused (403 deny/escalate, 429 rate limit, 407 no identity): say why.
  console.log("refused:", e.message);
  process.exit(e.status === 403 || e.status === 429 ? 0 : 1);
}
