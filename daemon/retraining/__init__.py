"""retraining: the model loop around the service.

``nightly`` is the nightly job (a new site profile / standardizer from recent images),
``finetuning`` its classifier half (from expert reviews), ``runs`` what both share (run rows,
the training child process), ``promotion`` the gate a candidate must pass, ``scheduler`` the cron
schedule and the one-job-at-a-time lock, ``reprocess`` re-runs archived files through the pipeline,
``retention`` removes run folders and unused candidates after ``[retraining] keep_days``.
May import: the foundation, intake, versions, pipeline.
"""
