"""The `sparge` command-line interface (Typer); all work is done by the `sparge` package."""
