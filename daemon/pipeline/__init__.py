"""pipeline: one micro-batch from ready files to recorded, filed results (the one path).

``runner`` holds the Pipeline (service, ingest and benchmarks call it), ``batch`` the per-file
state and intake threads, ``claiming`` the batch's claims, ``recording`` the one results
transaction, ``filing`` the moves to archive or quarantine. May import: the foundation, intake,
versions.
"""
