"""The command line's error contract: user-fixable failures are one line and exit status 2."""

import argparse

import pytest

from lipgan import cli


def _parser_running(func):
    parser = argparse.ArgumentParser(prog="lipgan")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("boom").set_defaults(func=func)
    return parser


@pytest.mark.parametrize(
    "exc, expect",
    [
        (PermissionError(13, "Permission denied", "/srv/runs/a"), "/srv/runs/a: Permission denied"),
        (OSError(28, "No space left on device", "/tmp/full/x.pt"), "No space left on device; free"),
        (NotADirectoryError(20, "Not a directory", "/tmp/f/x"), "/tmp/f/x: Not a directory"),
    ],
)
def test_an_unwrapped_os_error_is_one_line_naming_the_path(monkeypatch, capsys, exc, expect):
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_running(boom))
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipgan: error: ") and expect in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_data_folder_below_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status = cli.main(["data", "info", "mnist", "--data-dir", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("lipgan: error: ") and "Traceback" not in err
