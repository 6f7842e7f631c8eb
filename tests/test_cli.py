"""The command line itself: help, version, shell completion, and errors that need no model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stade_cli import __version__
from stade_cli.cli.completions import COMPLETE_VAR, completion_scripts, main, write_completions

from helpers import invoke

ROOT = Path(__file__).resolve().parent.parent


def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"stade {__version__}"


@pytest.mark.parametrize(("args", "exit_code"), [([], 2), (["--help"], 0), (["-h"], 0)])
def test_help_lists_commands(args: list[str], exit_code: int) -> None:
    res = invoke(*args)
    assert res.exit_code == exit_code  # no arguments: the help, with Click's usage-error exit code
    assert "calibrate" in res.output and "stats" in res.output


@pytest.mark.parametrize("command", [["calibrate"], ["stats"], ["stats", "show"], ["stats", "merge"]])
def test_command_help(command: list[str]) -> None:
    res = invoke(*command, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_calibrate_help_shows_options() -> None:
    res = invoke("calibrate", "--help")
    assert res.exit_code == 0
    for opt in ("--out", "--data", "--nsamples", "--seqlen", "--seed", "--hessian", "--device", "--force", "--json"):
        assert opt in res.output


def test_help_is_instant_without_torch() -> None:
    """`stade --help` must not import torch or transformers (lazy imports keep it fast)."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom stade_cli.cli import app\n"
        "CliRunner().invoke(app, ['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_command() -> None:
    res = invoke("frobnicate")
    assert res.exit_code == 2
    assert "frobnicate" in res.output


def test_missing_out_option() -> None:
    res = invoke("calibrate", "smollm2-135m")
    assert res.exit_code == 2
    assert "--out" in res.output


def test_batch_size_must_be_positive(tmp_path: Path) -> None:
    res = invoke("calibrate", "smollm2-135m", "--out", str(tmp_path / "o"), "--batch-size", "0")
    assert res.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_bad_dtype_choice(tmp_path: Path) -> None:
    res = invoke("calibrate", "smollm2-135m", "--out", str(tmp_path / "o"), "--dtype", "int8")
    assert res.exit_code == 2
    assert "int8" in res.output


def test_stats_show_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"kind": "something-else"}')
    res = invoke("stats", "show", str(tmp_path))
    assert res.exit_code == 1
    assert "not a stade statistics folder" in " ".join(res.stderr.split())


def test_stade_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stade_cli.base.errors import StadeError

    monkeypatch.setenv("STADE_DEBUG", "1")
    res = invoke("stats", "show", str(tmp_path / "missing"))
    assert res.exit_code == 1
    assert isinstance(res.exception, StadeError)


# ----------------------------------------------------------------------------------------------- completion


def test_committed_completions_are_current() -> None:
    """Regenerate with `make completions` when this fails."""
    for fname, text in completion_scripts().items():
        committed = ROOT / "completions" / fname
        assert committed.exists(), f"{committed} is missing: run `make completions`"
        assert committed.read_text(encoding="utf8") == text, f"{committed} is stale: run `make completions`"


def test_completion_scripts_are_deterministic_and_name_stade() -> None:
    first, second = completion_scripts(), completion_scripts()
    assert first == second
    assert set(first) == {"stade.bash", "stade.zsh", "stade.fish"}
    for text in first.values():
        assert COMPLETE_VAR in text and "stade" in text and text.endswith("\n")
    assert "complete -o default -F _stade_completion stade" in first["stade.bash"]
    assert first["stade.zsh"].startswith("#compdef stade")
    assert first["stade.fish"].startswith("complete --command stade")


def test_committed_bash_script_completes_in_bash(tmp_path: Path) -> None:
    """Source completions/stade.bash in a real bash and run its completion function, as the shell would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stade = bin_dir / "stade"  # the installed entry point, for a checkout that was not pip-installed
    stade.write_text(f"#!{sys.executable}\nfrom stade_cli.cli import main\n\nmain()\n")  # as pip writes it
    stade.chmod(0o755)
    script = (
        f"source {ROOT / 'completions' / 'stade.bash'}\n"
        "COMP_WORDS=(stade ca); COMP_CWORD=1; _stade_completion stade\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["calibrate"], res.stdout + res.stderr


def test_completions_use_no_private_typer_module() -> None:
    """Typer's private modules change without notice; the style guide allows only the public `typer` API."""
    for path in (ROOT / "stade_cli" / "cli").glob("*.py"):
        source = path.read_text()
        assert "typer._" not in source and "import click" not in source and "from click" not in source, path


def test_write_completions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "c")])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["stade.bash", "stade.fish", "stade.zsh"]
    assert capsys.readouterr().out.count("stade.") == 3
    assert write_completions(tmp_path / "c")[0].read_text() == completion_scripts()["stade.bash"]
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("stade ca", 1, ["calibrate"]),
        ("stade st", 1, ["stats"]),
        ("stade stats ", 2, ["show", "merge"]),
        ("stade calibrate --hes", 2, ["--hessian", "--hessian-dtype"]),
    ],
)
def test_bash_completion_answers(words: str, cword: int, expected: list[str]) -> None:
    env = {COMPLETE_VAR: "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    res = invoke(env=env)
    assert res.exit_code == 0
    assert res.stdout.split() == expected


def test_json_output_is_strict_json_for_non_finite_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    """A diverged perplexity is `inf`: `--json` must still print JSON that strict readers (jq) accept."""
    import json

    from stade_cli.cli.options import print_json

    print_json({"ppl": float("inf"), "rows": [{"loss": float("nan"), "low": float("-inf"), "ok": 1.5}]})

    def refuse(name: str) -> None:
        raise AssertionError(f"non-JSON constant {name} on stdout")

    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert doc == {"ppl": "inf", "rows": [{"loss": "nan", "low": "-inf", "ok": 1.5}]}
