"""Release: ``export`` (checkpoint → ONNX model folder), ``calibrate`` (temperature scaling,
reliability diagram), ``finalize`` (the one release step every model folder goes through),
``card`` (CARD.md), ``promote`` (replace a folder only by a better model)."""
