"""The query side: payment history answered from the Redis read models only."""
