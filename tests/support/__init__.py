"""What the tests share: servers and processes to start, sources to write, read models to check.

One module per subject; a helper lives in exactly one of them.
"""
