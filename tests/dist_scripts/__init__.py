"""Worker scripts of the distributed tests (run as separate processes by tests/_dist.py)."""
