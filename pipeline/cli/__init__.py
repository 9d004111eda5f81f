"""The ``modelbuild`` command line (typer): one module per command group, one error boundary."""
