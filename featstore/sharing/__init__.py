"""Sharing stores: locations on filesystems and S3 (location.py), one writer per store (lease.py), the
catalog over a root (catalog.py) and verified copies (transfer.py)."""
