"""``python -m dormant.mcp``: the MCP server (see :mod:`dormant.mcp`)."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
