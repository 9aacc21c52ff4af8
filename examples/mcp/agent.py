#!/usr/bin/env python3
"""An MCP client agent built with the official MCP Python SDK (mcp 2.x), talking to the
ticket-desk server (examples/mcp/server.py) through UAPK Gateway.

Base-URL mode: the SDK connects to the gateway's proxy listener at /CONNECTOR/mcp, and the
capability token rides in an `x-uapk-capability` header on the SDK's http client:

    UAPK_TOKEN=... python3 examples/mcp/agent.py --base-url http://127.0.0.1:15080/tickets/mcp

Explicit-proxy mode: the SDK connects to the MCP server's own URL, through the gateway as an
HTTP proxy (the token is the proxy password):

    UAPK_TOKEN=... python3 examples/mcp/agent.py --url http://127.0.0.1:9000/mcp \
        --proxy http://127.0.0.1:15080

By default it uses the SDK's high-level Client, which negotiates the newest protocol the server
speaks; `--protocol legacy` uses a ClientSession with the initialize handshake instead.
It lists the tools, reads a ticket, streams an export (progress events), asks for a large
refund (escalated: the SDK raises an MCPError naming the decision, reason code and record) and
calls a tool the manifest does not allow (tool_not_allowed). Each outcome is printed on one line
starting with `allow`, `refused` or `error`; the exit status is 0 when every call got an answer.
"""

import argparse
import os
import sys
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2
from mcp import Client, ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client


def http_client(args: argparse.Namespace, token: str) -> httpx2.AsyncClient:
    timeout = httpx2.Timeout(30.0, read=300.0)
    if args.proxy:
        # The gateway identifies the agent by the proxy credentials: http://agent:TOKEN@host:port
        p = urlsplit(args.proxy)
        proxy = urlunsplit((p.scheme, f"agent:{token}@{p.hostname}:{p.port}", p.path, "", ""))
        return httpx2.AsyncClient(proxy=proxy, timeout=timeout, trust_env=False)
    return httpx2.AsyncClient(headers={"x-uapk-capability": token}, timeout=timeout, trust_env=False)


def text_of(result) -> str:
    return " ".join(getattr(c, "text", str(c)) for c in result.content)


async def call(session, label: str, name: str, arguments: dict, progress=None) -> bool:
    try:
        result = await session.call_tool(name, arguments, progress_callback=progress)
    except MCPError as e:
        # A gateway refusal: JSON-RPC error -32003 whose message is
        # "<decision>: <code>: <message> (record N)".
        line = f"refused {label}: MCPError {e.code}: {e.message}"
        if isinstance(e.data, dict) and e.data.get("approval_id"):
            line += f" [approval {e.data['approval_id']}]"
        print(line)
        return True
    if result.is_error:
        print(f"error {label}: {text_of(result)}")
        return False
    print(f"allow {label}: {text_of(result)}")
    return True


async def work(session, refund_amount: float) -> bool:
    """The agent's task, the same whichever way it is connected."""
    tools = await session.list_tools()
    print("tools " + " ".join(t.name for t in tools.tools))
    ok = await call(session, "read_ticket", "read_ticket", {"id": "T-1001"})

    steps = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        steps.append(done)
        print(f"progress {done:g}/{total or 0:g} {message or ''}".rstrip())

    ok &= await call(session, "export_tickets", "export_tickets", {"count": 3}, progress)
    print(f"progress events {len(steps)}")
    ok &= await call(session, "refund", "refund", {"amount": refund_amount, "customer": "cus_123"})
    ok &= await call(session, "delete_ticket", "delete_ticket", {"id": "T-1001"})
    return ok


async def run(args: argparse.Namespace) -> int:
    token = os.environ.get("UAPK_TOKEN", "")
    if not token:
        print("UAPK_TOKEN is not set (mint one with `uapk-gateway token mint`)", file=sys.stderr)
        return 2
    url = args.url or args.base_url
    async with http_client(args, token) as client:
        if args.protocol == "legacy":
            # The initialize handshake (protocol 2025-11-25 and earlier), on a ClientSession.
            async with streamable_http_client(url, http_client=client) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    print(f"session {init.server_info.name} (protocol {init.protocol_version})")
                    ok = await work(session, args.refund_amount)
        else:
            # The SDK's high-level client: probes server/discover and uses the newest protocol the
            # server speaks (2026-07-28: Mcp-Method / Mcp-Name headers on every request), else
            # falls back to the initialize handshake.
            async with Client(streamable_http_client(url, http_client=client)) as session:
                name = session.server_info.name if session.server_info else "?"
                print(f"session {name} (protocol {session.protocol_version})")
                ok = await work(session, args.refund_amount)
    return 0 if ok else 1


def main() -> None:
    p = argparse.ArgumentParser(description="MCP agent through UAPK Gateway")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="the gateway's MCP endpoint, http://GATEWAY/CONNECTOR/mcp")
    target.add_argument("--url", help="the MCP server's own URL, reached through --proxy")
    p.add_argument("--proxy", help="the gateway as an HTTP proxy, http://HOST:PORT (with --url)")
    p.add_argument("--refund-amount", type=float, default=900.0)
    p.add_argument(
        "--protocol",
        choices=["auto", "legacy"],
        default="auto",
        help="auto: the SDK's Client (server/discover, newest protocol); legacy: the initialize handshake",
    )
    args = p.parse_args()
    if args.url and not args.proxy:
        p.error("--url needs --proxy (the gateway); without one the call would bypass it")
    sys.exit(anyio.run(run, args))


if __name__ == "__main__":
    main()
