"""The extraction service: the HTTP API (api.py), the persistent job queue and its workers (jobs.py), the
child's status file (status.py) and the client behind `featstore submit/jobs/job` (client.py)."""
