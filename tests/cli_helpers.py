"""Assertions shared by the CLI tests."""

from __future__ import annotations


def one_error_line(result, code: int = 2, *needles: str, after_work: bool = False) -> str:
    """Assert that a CLI run failed the documented way: exit ``code``, no traceback, exactly one line on stderr
    holding each of ``needles``, and nothing else printed, unless ``after_work`` (the mistake only shows once
    work has started, so progress output may come first). Returns the error line, whitespace collapsed."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    err = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1, result.output
    if not after_work:
        assert not result.stdout.strip(), result.output
    for n in needles:
        assert n in err[0], result.output
    return " ".join(err[0].split())
