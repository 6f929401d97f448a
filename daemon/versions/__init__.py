"""versions: which model versions exist and which one serves.

``registry`` keeps model versions in SQL (register, activate, promote, roll back, verify sha256),
``loading`` loads the active standardizer and classifier for the pipeline, ``hotswap`` swaps a newly
promoted version into the running service between batches (retrying one it refused at every poll), and
``serving`` records what each worker actually serves, for ``status`` and the metrics; ``shadow`` picks the candidate
each site shadows while it awaits evidence and loads it beside the active pair. May import: the foundation, intake.
"""
