"""Training data: labelled rows (``rows``), the public-file map (``sources``), the balanced
set (``build``) and the train / validation / test splits (``splits``)."""
