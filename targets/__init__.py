"""Built-in targets, one module each: pytorch (.pt2 / generated source), hf, onnx, safetensors; and the
tensor-parallel runtime (``python -m evo_rewrite.targets.parallel``). They register through the
``evo_rewrite.targets`` entry-point group (pyproject.toml), as a third-party package's targets do."""
