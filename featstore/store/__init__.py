"""The store: its format (format.py, manifest.py), where bytes live (backends/), reading (reader.py, and
the PyTorch adapter dataset.py), integrity (integrity.py, verify.py) and the summary (info.py)."""
