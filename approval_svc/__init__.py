"""The command side: accounts and payments, decided by the business rules and committed to PostgreSQL."""
