"""The serving layer: a prediction service scoring with the registry's ONNX model versions
(hot-swapped on alias moves, chosen by a serving policy) on features from the batch views merged
with the speed layer's increments. It talks to the other layers only through the MLflow registry
and the Delta tables named in ``lambda_ml.contract``.

Entry points: ``serving_layer.app.create_app(cfg)`` (the ASGI app) and
``serving_layer.server.serve(cfg)`` (run it with uvicorn); ``python -m serving_layer --help``.
"""
