"""service: the long-running process (`stainbridge run`).

``lifecycle`` holds the Service (run / run_once / stop, signals), ``startup`` waits for the database
and the models, ``health`` the watchdog thread and database checks, ``sdnotify`` talks to systemd.
May import: every stage but commands.
"""
