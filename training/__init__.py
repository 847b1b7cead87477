"""UniGuard's offline training pipeline (torch): ``python -m training --help`` lists every stage.

Layers, lowest first (a module imports only from layers below it or its own package):
``paths`` / ``io`` / ``ui`` → ``data`` → ``model`` → ``eval`` → ``release`` → ``merging`` /
``search`` / ``sdg`` / ``stages`` → ``cli``.
"""
