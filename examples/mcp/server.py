#!/usr/bin/env python3
"""A small ticket-desk MCP server built with the official MCP Python SDK (mcp 2.x, MCPServer),
served over streamable HTTP at http://127.0.0.1:PORT/mcp.

    python3 examples/mcp/server.py --port 9000                # session (stateful) mode
    python3 examples/mcp/server.py --port 9000 --stateless    # stateless mode

Tools: read_ticket(id), refund(amount, customer), and export_tickets(count), which reports
progress while it works, so its result arrives as a server-sent event stream.
"""

import argparse

import anyio
from mcp.server.mcpserver import Context, MCPServer

app = MCPServer("ticket-desk")


@app.tool()
def read_ticket(id: str) -> str:
    """Read one support ticket."""
    return f"ticket {id}: printer on fire (status: open)"


@app.tool()
def refund(amount: float, customer: str) -> str:
    """Refund a customer, in USD."""
    return f"refunded {amount:.2f} USD to {customer}"


@app.tool()
async def export_tickets(count: int, ctx: Context) -> str:
    """Export tickets, reporting progress as it goes."""
    for i in range(count):
        await ctx.report_progress(i + 1, count, f"exported {i + 1} of {count}")
        await anyio.sleep(0.05)
    return f"exported {count} tickets"


def main() -> None:
    p = argparse.ArgumentParser(description="ticket-desk MCP server (streamable HTTP at /mcp)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--stateless", action="store_true", help="the SDK's stateless HTTP mode (no sessions)")
    a = p.parse_args()
    app.run("streamable-http", host=a.host, port=a.port, stateless_http=a.stateless)


if __name__ == "__main__":
    main()
