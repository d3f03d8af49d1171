"""pgmux benchmarks: ``run.py`` (pgbench and more, side by side with PostgreSQL and PgBouncer),
``idle_clients.py`` (memory per idle client) and ``relay_cpu.py`` (relay CPU without sockets)."""
