"""ATP: an Envoy external-processing sidecar for LLM API traffic."""

__version__ = "0.1.0"
