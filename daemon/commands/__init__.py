"""Operator commands around the service: each module is one `stainbridge <command>` (its
``add_arguments`` and ``run``), built on the service core in ``stainbridge.daemon``."""
