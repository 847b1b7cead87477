"""Serving benchmark: raw onnxruntime (the limit) against the service over HTTP. ``python -m bench``."""
