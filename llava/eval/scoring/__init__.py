"""Benchmark scorers: one small module per benchmark, each scoring answer files as LLaVA's own scripts do.

Every module has `NAME`, `add_arguments(parser)`, `score_from_args(args) -> dict`,
`format_metrics(metrics) -> str` and `main(argv) -> int`, and imports neither torch nor the model,
so scoring starts instantly.
"""
