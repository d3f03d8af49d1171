"""pgmux: a PostgreSQL connection pooler on asyncio and uvloop."""

__version__ = "0.1.0"
