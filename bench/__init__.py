"""Latency and throughput benchmark: Envoy alone vs a no-op ext_proc vs ATP (`make bench`)."""
