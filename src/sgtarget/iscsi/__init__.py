"""Sans-I/O iSCSI (RFC 7143): bytes in, events and buffer lists out. Never imports asyncio."""
