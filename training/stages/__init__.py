"""The paper's training stages, one module each: ``taskguard`` (one guard per policy),
``multitaskguard`` (GIP, then per-policy fine-tunes), ``default`` (the shipped model, a
preset of the same loop); ``finetune`` holds what they share."""
