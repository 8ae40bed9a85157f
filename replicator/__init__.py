"""Change data capture: PostgreSQL logical replication into the Redis read models."""
