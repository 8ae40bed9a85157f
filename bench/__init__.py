"""Load generators and the benchmark report."""
