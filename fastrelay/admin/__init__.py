"""The operator's side: admin HTTP API, its CLI, metrics, HTTP injection and the status page."""
