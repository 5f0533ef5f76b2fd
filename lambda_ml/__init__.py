"""Shared core of the lambda-ml platform: config, JVM set-up, Spark session, local stack,
event schemas and the event generator. Every layer depends on it; it depends on no layer."""

__version__ = "0.1.0"
