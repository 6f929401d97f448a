"""stainbridge.daemon: the service and the operator commands around it.

The service core is the path of one file: watcher (drop-folder events and scans) -> intake (ready,
hash, claim, decode; dicom for DICOM) -> pipeline (micro-batches through the models) -> store (SQL)
-> filing (archive or quarantine), run by service (lifecycle, signals, sd_notify). Around it, the
commands an operator types: cli (the one entry point), config, schema (`db`), ingest, status, demo.

The daemon reaches the models only through ``stainbridge.models.inference`` (load a standardizer,
load a classifier, score a batch); training runs as `stainbridge train ...` commands, never imported.
"""
