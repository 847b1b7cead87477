"""Synthetic data generation (SDG) from written policies, after the UniGuard paper.

An LLM (any OpenAI-compatible endpoint, or SmolLM2-135M in process for offline use)
writes safe and unsafe prompts for a policy; a template generator composes more from the
policy's own text; the LLM reviews a sample of its rows against the policy (self-
reflection) and proposes a clarified policy; near-duplicates are removed with the base
encoder's embeddings. Output rows use ``training.data.ExampleRow``'s JSONL format, so
``build_dataset`` consumes them like any hand-written file.

Modules: ``prompts`` (instructions + answer schemas), ``backends`` (chat completions),
``templates`` (policy-driven prompts), ``dedup`` (embeddings), ``refine`` (review and the
clarified policy), ``store`` (resumable output), ``generate`` (the run), ``cli``.
"""
