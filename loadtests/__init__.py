"""Locust scenarios, the local cluster harness and the benchmark."""
