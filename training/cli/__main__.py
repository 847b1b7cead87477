"""``python -m training.cli``: the old spelling of ``python -m training``, kept for one release."""

from training.cli import app

app()
