"""One module per ``avar`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
