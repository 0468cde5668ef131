"""Launching a job: the Ray cluster it runs on (``ray_cluster``) and what every launcher checks
and decides before a worker starts (``preflight``). Between the integrations, which it uses,
and the commands, which call it."""
