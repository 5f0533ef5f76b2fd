"""What sits above the three layers: the ``lambda-ml`` command line, the demo, the local stack
(Kafka and MLflow on loopback), the standalone Spark cluster and ``spark-submit``. The layers and
the applications never import it."""
