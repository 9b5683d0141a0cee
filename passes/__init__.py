"""Built-in passes, one module each. They register through the ``evo_rewrite.passes`` entry-point group
(pyproject.toml), exactly as a third-party package's passes do."""
