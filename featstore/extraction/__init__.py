"""Extraction: corpus input (corpus.py), windows (windows.py), the frozen encoder (encoder.py, models.py),
the spec (spec.py), the plan (plan.py), the block writer and progress ledger (writer.py), and the
orchestration with its engines (extract.py: this process; ray_engine.py: Ray actors)."""
