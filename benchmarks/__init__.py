"""``inferq bench``: inferq against raw ONNX Runtime and a Celery baseline on the same machine.

See ``benchmarks/README.md``. Entry points: :func:`benchmarks.cli.add_parser`
(the ``bench`` subcommand) and ``python -m benchmarks``.
"""
