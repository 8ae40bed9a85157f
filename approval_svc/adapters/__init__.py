"""PostgreSQL adapters: the repository and the unit of work, on SQLAlchemy Core and asyncpg."""
