"""The applications that run on the platform, one package each, registered in ``lambda_ml.apps``."""
