"""Models and the one training loop: ``modeling`` (classifier, MLM head, freezing), ``losses``
(GIP terms), ``batches`` (inputs, length-grouped batches), ``loop`` (every full fine-tune),
``head`` (CFT on cached features), ``checkpoints`` (folders and their metadata)."""
