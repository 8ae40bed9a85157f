"""Developer tooling: private PostgreSQL and Redis servers, the local stack, the demo."""
