"""The fine-tuning options: one typed set of defaults for the command line and for each run of
``tenvoo-fast profile`` (which builds its runs without re-parsing a command line)."""
import dataclasses

import pytest

from tenvoo_fast.ddpm.cli import build_parser
from tenvoo_fast.ddpm.compare import finetune_argv, method_options
from tenvoo_fast.ddpm.run_options import FinetuneOptions


def test_the_command_line_defaults_are_the_typed_defaults():
    parsed = build_parser().parse_args(["finetune", "--device", "cpu"])
    assert FinetuneOptions.from_namespace(parsed) == FinetuneOptions(device="cpu")
    fields = {f.name for f in dataclasses.fields(FinetuneOptions)}
    assert set(vars(parsed)) - fields == {"command", "func"}, "every option is typed"


@pytest.mark.parametrize("argv", [
    ["--preset", "tiny", "--steps", "6"],
    ["--preset", "tiny", "--rank", "3", "--size", "16", "16", "16", "--autotune", "--strategy",
     "merged", "--lr", "1e-3", "--device", "cpu", "--backend", "reference"],
])
def test_profile_runs_equal_their_recorded_command_lines(argv):
    """Each method's options are what its recorded ``finetune`` command line parses to."""
    parser = build_parser()
    opts = parser.parse_args(["profile", *argv])
    for method in ("full", "tenvoo-l", "lora"):
        direct = method_options(opts, method)
        reparsed = FinetuneOptions.from_namespace(parser.parse_args(finetune_argv(opts, method)))
        assert direct == reparsed
        assert direct.method == method and direct.overwrite
