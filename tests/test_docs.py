"""Every command that the README and docs/ show parses with the options it is shown with.

A renamed or removed option then fails here rather than in a reader's terminal. Commands are read from the
fenced code blocks, continuation lines joined; shell variables (`$n`, `${run%:*}`, `$((3000 / n))`) stand for
1; a synopsis's brackets are dropped. Each is parsed by its own entry point's parser, as its main() would
parse it, and nothing is run.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|&& |; |do |then )python (?:-m (?P<module>[\w.]+)|(?P<script>\w+)\.py)(?P<args>.*)$")
NOT_OURS = {"pytest"}  # commands whose options are not this project's
VARIABLE = re.compile(r"\$\(\([^)]*\)\)|\$\{[^}]*\}|\$\w+")


def doc_commands() -> list:
    found = []
    for page in PAGES:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                match = COMMAND.search(line)
                if line.startswith("#") or match is None or match["module"] in NOT_OURS:
                    continue
                # A synopsis shows optional parts in brackets, and what goes after -- in capitals.
                argv = shlex.split(VARIABLE.sub("1", re.sub(r"[\[\]]", " ", match["args"])), comments=True)
                if "--" in argv and all(word.isupper() for word in argv[argv.index("--") + 1:]):
                    argv = argv[:argv.index("--")]
                name = match["module"] or match["script"]
                found.append(pytest.param(name, argv, id=f"{page.name}: {name} {' '.join(argv)}"[:120]))
    return found


class Parsed(Exception):
    """Raised in place of running a command once its parser has accepted the command line."""


def parse_with_main(main, argv: list[str], monkeypatch) -> None:
    """Parse as `main` does, for entry points whose parser lives inside main: stop as soon as it has parsed."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parse(parser, args, namespace)
        raise Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", ["doc", *argv])
    with pytest.raises(Parsed):
        main(argv) if main.__code__.co_argcount else main()


def parse_command(name: str, argv: list[str], monkeypatch) -> None:
    import train
    if name == "train":
        train.parse_args(argv)
    elif name == "sample":
        import sample
        sample.parse_args(argv)
    elif name == "fid":
        from fid.__main__ import build_parser
        build_parser().parse_args(argv)
    elif name in ("evaluate.sweep", "evaluate.experiment"):
        module = __import__(name, fromlist=["parse_args"])
        _, passed = module.parse_args(argv)
        train.parse_args(["--stage", "classify", *passed])  # the options after --, for the classifiers it trains
    elif name in ("evaluate.gradcam", "evaluate.consistency", "data.export"):
        __import__(name, fromlist=["parse_args"]).parse_args(argv)
    elif name in ("bench", "bench.bench_invert"):
        main = __import__("bench.__main__" if name == "bench" else name, fromlist=["main"]).main
        parse_with_main(main, argv, monkeypatch)
    elif name == "examples.tiny_ddpm":  # shown without options
        assert argv == []
    else:
        raise AssertionError(f"the docs show `python -m {name}`; add how its command line is parsed to this test")


@pytest.mark.parametrize("name, argv", doc_commands())
def test_every_command_in_the_docs_parses(name, argv, monkeypatch):
    parse_command(name, argv, monkeypatch)


def test_the_docs_show_commands_of_every_entry_point():
    """The reader above finds the commands (a change to the pages' format would leave it finding none)."""
    names = {param.values[0] for param in doc_commands()}
    assert {"train", "sample", "fid", "evaluate.sweep", "evaluate.experiment", "data.export"} <= names
    assert len(doc_commands()) > 60
