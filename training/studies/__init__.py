"""One-off studies that measure choices (base encoder, serving-graph format); not pipeline stages."""
