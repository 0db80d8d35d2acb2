"""One module per workflow command: ``add_arguments(parser)`` and ``run(args)``."""
