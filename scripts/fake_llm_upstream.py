#!/usr/bin/env python3
"""A fake LLM API for tests (Python standard library only): OpenAI chat completions
(POST /v1/chat/completions) and Anthropic messages (POST /v1/messages), each as JSON or, with
"stream": true, as server-sent events sent event by event, with token usage as the real APIs
report it:

- OpenAI JSON: usage {prompt_tokens 40, completion_tokens 20, total_tokens 60};
- OpenAI stream: usage only with stream_options.include_usage, in a last chunk with no
  choices before [DONE]: 30 + 12 = 42;
- Anthropic JSON: usage {input_tokens 25, output_tokens 11} (36);
- Anthropic stream: input_tokens 31 in message_start, output_tokens 15 in the last
  message_delta (46).

Usage: fake_llm_upstream.py PORT [--host H] [--cert CERT --key KEY] [--log FILE]
With --cert/--key it speaks HTTPS. Every request is appended to --log as one JSON line
(method, path, headers, body) so a test can assert what reached the upstream.
"""

import argparse
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


def openai_json(req):
    return {
        "id": "chatcmpl-fake1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model", "gpt-4o-mini"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital of France.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60},
    }


def openai_events(req):
    base = {"id": "chatcmpl-fake2", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": req.get("model", "gpt-4o-mini")}
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    words = ["The ", "Seine ", "flows ", "through ", "Paris."]
    chunks = []
    for i, w in enumerate(words):
        delta = {"content": w} if i else {"role": "assistant", "content": w}
        c = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        if include_usage:
            c["usage"] = None
        chunks.append(c)
    last = dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    if include_usage:
        last["usage"] = None
    chunks.append(last)
    if include_usage:
        chunks.append(dict(base, choices=[], usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}))
    return ["data: " + json.dumps(c) + "\n\n" for c in chunks] + ["data: [DONE]\n\n"]


def anthropic_json(req):
    return {
        "id": "msg_fake1",
        "type": "message",
        "role": "assistant",
        "model": req.get("model", "claude-sonnet-4-5"),
        "content": [{"type": "text", "text": "Paris is the capital of France."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 11},
    }


def anthropic_events(req):
    def ev(name, data):
        return "event: " + name + "\ndata: " + json.dumps(data) + "\n\n"

    msg = {"id": "msg_fake2", "type": "message", "role": "assistant", "model": req.get("model", "claude-sonnet-4-5"),
           "content": [], "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": 31, "output_tokens": 1}}
    out = [ev("message_start", {"type": "message_start", "message": msg}),
           ev("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
           ev("ping", {"type": "ping"})]
    for w in ["The ", "Seine ", "flows ", "through ", "Paris."]:
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": w}}))
    out.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                                    "usage": {"output_tokens": 9}}))
    out.append(ev("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                    "usage": {"output_tokens": 15}}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file = None

    def _record(self, body):
        if not self.log_file:
            return
        line = json.dumps({"method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        with LOCK, open(self.log_file, "a") as f:
            f.write(line + "\n")

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _events(self, events):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for e in events:
            data = e.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n)
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            req = None
        self._record(req)
        if not isinstance(req, dict):
            return self._json(400, {"error": {"type": "invalid_request_error", "message": "body is not JSON"}})
        path = self.path.split("?")[0]
        stream = req.get("stream") is True
        if path == "/v1/chat/completions":
            return self._events(openai_events(req)) if stream else self._json(200, openai_json(req))
        if path == "/v1/messages":
            return self._events(anthropic_events(req)) if stream else self._json(200, anthropic_json(req))
        self._json(404, {"error": {"type": "not_found_error", "message": "no such endpoint: " + path}})

    def do_GET(self):
        self._record(None)
        if self.path.split("?")[0] == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})
        self._json(404, {"error": {"type": "not_found_error", "message": "no such endpoint"}})

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--log")
    a = ap.parse_args()
    Handler.log_file = a.log
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    if a.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"fake LLM upstream on {'https' if a.cert else 'http'}://{a.host}:{a.port}", file=sys.stderr, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
