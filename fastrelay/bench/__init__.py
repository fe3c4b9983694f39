"""The benchmark and crash-chaos tools (`fastrelay bench`, `python -m fastrelay.bench.sink` ...)."""
