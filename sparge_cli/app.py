"""`sparge` command-line entry point: registers the sub-commands and maps errors to exit codes.

Exit codes: 0 success, 1 runtime failure, 2 usage error (bad option value, missing file, ...).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sparge",
    help="Trainable sparse attention for video diffusion transformers (Wan2.1): bench, generate, calibrate, finetune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """sparge: hybrid Top-k+Top-p block-sparse attention for Wan2.1 in diffusers."""


from sparge_cli import bench as _bench  # noqa: E402

_bench.register(app)

from sparge_cli import generate as _generate  # noqa: E402

_generate.register(app)

from sparge_cli import calibrate as _calibrate  # noqa: E402

_calibrate.register(app)

from sparge_cli import finetune as _finetune  # noqa: E402

_finetune.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
