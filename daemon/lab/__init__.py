"""lab: what the lab reads: the HTML report (``report`` gathers, ``render`` draws), the SQL views
(``views``) and the Prometheus metrics (``metrics``). May import: the foundation, intake, versions,
pipeline, retraining.
"""
