"""``python -m training``: the training pipeline's one command line (see ``training.cli``)."""

from training.cli import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
