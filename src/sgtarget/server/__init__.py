"""asyncio glue: portals, protocol adapters, timers, daemon lifecycle."""
