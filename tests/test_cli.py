import subprocess
import sys

from medcl.cli import COMMANDS, build_parser


def test_help_lists_every_implemented_command():
    parser = build_parser()
    help_text = parser.format_help()
    assert "medcl" in help_text
    out = subprocess.run([sys.executable, "-m", "medcl", "--help"], capture_output=True, text=True, check=True)
    assert "COMMAND" in out.stdout
    registered = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert registered <= set(COMMANDS)
