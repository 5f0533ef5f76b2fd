"""Shared core of the lambda-ml platform: config, the per-layer contracts and the application
registry, the lake catalog, event schemas and validation, the horizon and model-update
contract, feature declarations, shared metrics, JVM jars and the Spark session, and the
producer. Every layer depends on it; it depends on no layer."""

__version__ = "0.1.0"
