"""Evaluation: ``scoring`` (the one scorer, through the service's input builder and loader),
``metrics``, ``thresholds`` (per-policy thresholds for a stated target), ``report`` (tables)."""
