"""stainbridge.daemon: the service and the operator commands around it, grouped by stage.

The path of one file: ``intake`` (drop-folder events and scans, reading, hashing, claiming, decoding)
-> ``pipeline`` (micro-batches: claim, decode, the models, one commit, filing) -> SQL. Around it:
``versions`` (the model registry, loading and hot-swapping the active checkpoints), ``retraining``
(the nightly job, fine-tuning, the promotion gate, its scheduler, reprocessing), ``lab`` (report,
SQL views, metrics), ``service`` (the long-running process: lifecycle, start-up, health,
sd_notify) and ``commands`` (what an operator types, behind ``cli``).

The foundation sits beside the stages: ``config`` (+ ``config_values``), ``logs``, ``store`` (the
SQL tables), ``schema`` (Alembic from code), ``diskspace`` and ``folders``.

Import rule (checked by tests/test_layout.py): a module imports only from its own stage and the
stages listed before it here: foundation, intake, versions, pipeline, retraining, lab, service,
commands, cli. No import loops, ``TYPE_CHECKING`` imports included. The daemon reaches the models
only through ``stainbridge.models.inference``; training runs as `stainbridge train ...` commands
in a child process, never imported.
"""
