"""What tests (and bench scripts) share: the live service, a fake OpenAI-compatible upstream."""
