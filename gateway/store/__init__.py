"""The SQL transcript store: models, engine, migrations, search, read queries, users.

Calls reach SQL only through :mod:`gateway.persister`, which reads the Redis
event stream, so a slow or down database never stalls a call. SQLite (the
default, one file) or PostgreSQL, chosen by one SQLAlchemy URL.
"""
