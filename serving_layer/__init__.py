"""The serving layer: a prediction service scoring with the registry's champion ONNX model on
features from the batch views. It talks to the other layers only through the MLflow registry
and the Delta tables named in ``lambda_ml.contract``.

Entry points: ``serving_layer.app.create_app(cfg)`` (the ASGI app) and
``serving_layer.server.serve(cfg)`` (run it with uvicorn); ``python -m serving_layer --help``.
"""
