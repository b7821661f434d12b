"""The GitHub Actions workflows, checked offline: actionlint and zizmor find nothing, every
action is pinned by commit SHA, and every command a `run:` step calls exists (a Makefile
target, a `runway` command, or a shell command from the list below)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import yaml

from pipeline.cli import app

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))

# plain shell commands a `run:` step may call besides `make <target>` and `runway <command>`
SHELL_COMMANDS = {
    "[", "cat", "cp", "echo", "exit", "false", "gh", "git", "grep", "head", "jq", "mkdir",
    "printf", "read", "test", "true", "unset",
}  # fmt: skip
KEYWORDS = {"if", "then", "elif", "else", "while", "until", "do", "!", "{"}
ENDS = {"fi", "done", "}"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "\n"}
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")
VERSION_COMMENT = re.compile(r"#\s*v\d+\.\d+\.\d+\s*$")


def tool(name: str) -> str:
    """The linter installed next to this Python (the `dev` extra), else one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true


def steps(workflow: dict):
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, job, step


def substitutions(token: str) -> list[str]:
    """The scripts inside `$( … )` in one word."""
    found, start = [], token.find("$(")
    while start != -1:
        depth, i = 0, start + 1
        while i < len(token):
            depth += {"(": 1, ")": -1}.get(token[i], 0)
            if depth == 0:
                break
            i += 1
        found.append(token[start + 2 : i])
        start = token.find("$(", i)
    return found


def commands(script: str) -> list[list[str]]:
    """Every simple command of a shell script as its words, those in `$( … )` included
    (redirections stay among the words; a `for` header, `fi`, `done` and `}` are no command)."""
    lexer = shlex.shlex(
        script.replace("\\\n", " ").replace("\n", " \n "), posix=True, punctuation_chars=True
    )
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    found: list[list[str]] = []
    current: list[str] | None = None  # the command being read; None: the next word starts one
    previous, array_depth = "", 0
    for token in lexer:
        for inner in substitutions(token):
            found += commands(inner)
        if array_depth:  # inside `name=( … )`: words, not commands
            if set(token) <= set(";&|()"):
                array_depth += token.count("(") - token.count(")")
        elif token == "(" and current is None and previous.endswith("="):
            array_depth = 1
        elif token in SEPARATORS or set(token) <= set(";&|()"):
            current = None
        elif current is None and token in KEYWORDS:
            pass
        elif current is None and (token in ENDS or token == "for"):
            current = []  # not a command: not kept
        elif current is None and re.match(r"^[A-Za-z_]\w*\+?=", token):
            pass  # an assignment before (or instead of) a command
        elif current is None:
            current = [token]
            found.append(current)
        else:
            current.append(token)
        previous = token
    return found


def make_targets() -> set[str]:
    """The targets the Makefile defines, as make itself reads it (variables expanded)."""
    database = subprocess.run(
        ["make", "-pRrq", "-f", "Makefile", ":"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    targets, not_target = set(), False
    for line in database.splitlines():
        if line == "# Not a target:":
            not_target = True
            continue
        match = re.match(r"^([^\s#:=][^:=]*):(?!=)", line)
        if match and not not_target and not re.match(r"^\.[A-Z_]+$", match.group(1)):
            targets.update(match.group(1).split())
        not_target = False
    return targets


def runway_commands() -> set[str]:
    """`runway` commands as words: `retrain`, `store relocate`, …"""
    names: set[str] = set()

    def walk(command, ctx: typer.Context, prefix: str) -> None:
        for name in command.list_commands(ctx) if hasattr(command, "list_commands") else []:
            sub = command.get_command(ctx, name)
            names.add(f"{prefix}{name}")
            walk(sub, typer.Context(sub, parent=ctx, info_name=name), f"{prefix}{name} ")

    root = typer.main.get_command(app)
    walk(root, typer.Context(root, info_name="runway"), "")
    return names


def run_scripts():
    for path in WORKFLOWS:
        for job_id, _, step in steps(load(path)):
            if "run" in step:
                yield f"{path.name}: {job_id}: {step.get('name', step['run'][:40])}", step["run"]


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"retrain.yml", "test.yml"}


def test_actionlint_finds_nothing():
    done = subprocess.run(
        [tool("actionlint"), "-no-color", *map(str, WORKFLOWS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_offline_finds_nothing():
    done = subprocess.run(
        [tool("zizmor"), "--offline", "--no-progress", "--format", "plain", ".github/workflows"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No findings to report" in done.stdout, done.stdout


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_by_commit_sha_with_its_version(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.match(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", line)
        if match:
            where = f"{path.name}:{number}: {line.strip()}"
            assert PINNED.match(match.group(1)), f"not pinned by a full commit SHA: {where}"
            assert VERSION_COMMENT.search(match.group(2)), f"no `# vX.Y.Z` comment: {where}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_permissions_and_no_expressions_in_scripts(path):
    workflow = load(path)
    assert workflow["permissions"] == {}, "top-level permissions grant nothing"
    for job_id, job in workflow["jobs"].items():
        assert "permissions" in job, f"job {job_id} says which permissions it needs"
    for job_id, _, step in steps(workflow):
        assert "${{" not in step.get("run", ""), f"{job_id}: pass expressions through env:"
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False, job_id


def test_write_permissions_only_where_needed():
    jobs = load(ROOT / ".github/workflows/retrain.yml")["jobs"]
    granted = {job_id: job["permissions"] for job_id, job in jobs.items()}
    assert granted == {
        "retrain": {"contents": "read"},
        "comment": {"pull-requests": "write"},
        "pull-request": {"contents": "write", "pull-requests": "write"},
    }
    assert "schedule" in jobs["pull-request"]["if"]
    assert "pull_request" in jobs["comment"]["if"]


def test_retrain_triggers_and_secrets():
    path = ROOT / ".github/workflows/retrain.yml"
    workflow = load(path)
    on = triggers(workflow)
    watched = {"**/*.dvc", "data/**", "params.yaml", "dvc.yaml", "dvc.lock", "pipeline/**"}
    assert watched <= set(on["pull_request"]["paths"])
    assert watched <= set(on["push"]["paths"]) and on["push"]["branches"] == ["main"]
    assert on["schedule"][0]["cron"]
    assert set(on["workflow_dispatch"]["inputs"]) == {"set", "force"}
    env = next(s for _, _, s in steps(workflow) if s.get("name") == "Retrain")["env"]
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert env[name] == f"${{{{ secrets.{name} }}}}"
    # secrets reach a step only through env:, never inline
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if "secrets." in line:
            assert re.match(r"^\s+[A-Z_]+: \$\{\{ secrets\.[A-Z_]+ \}\}$", line), number


def test_the_report_marker_is_the_one_runway_writes():
    from pipeline import retrain

    assert retrain.MARKER in (ROOT / ".github/workflows/retrain.yml").read_text()


def test_the_retrain_options_the_workflow_passes_exist():
    script = next(s for name, s in run_scripts() if name.startswith("retrain.yml: retrain: Ret"))
    passed = set(re.findall(r"args\+=\((--[\w-]+)", script))
    assert passed == {"--set", "--force", "--base"}
    root = typer.main.get_command(app)
    retrain = root.get_command(typer.Context(root, info_name="runway"), "retrain")
    assert retrain is not None, "runway has no retrain command"
    known = {opt for param in retrain.params for opt in param.opts}
    assert passed <= known, f"runway retrain lacks {sorted(passed - known)}"


def test_commands_parse_as_expected():
    script = """
    for x in a b; do echo "$x" > f; done
    id=$(gh api "x/$(git rev-parse HEAD)" --jq '.[] | select(.a) | .id' | head -n 1)
    if ! git diff --quiet \\
       && jq -e '.p' f > /dev/null; then args+=(--force "$y"); fi
    { echo a; cat f; } > out
    make retrain X=1 && .venv/bin/runway store relocate
    """
    assert commands(script) == [
        ["echo", "$x", ">", "f"],
        ["gh", "api", "x/$(git rev-parse HEAD)", "--jq", ".[] | select(.a) | .id"],
        ["git", "rev-parse", "HEAD"],
        ["head", "-n", "1"],
        ["git", "diff", "--quiet"],
        ["jq", "-e", ".p", "f", ">", "/dev/null"],
        ["echo", "a"],
        ["cat", "f"],
        ["make", "retrain", "X=1"],
        [".venv/bin/runway", "store", "relocate"],
    ]


def unknown_commands(script: str, targets: set[str], subcommands: set[str]) -> list[str]:
    """What a script calls that does not exist or is not allowed, one phrase each."""
    problems = []
    for words in commands(script):
        head, args = words[0], [w for w in words[1:] if not w.startswith("-")]
        if head == "make":
            wanted = [w for w in args if "=" not in w and w[:1] not in "<>"]
            problems += [f"no Makefile target {t!r}" for t in wanted if t not in targets]
            problems += [] if wanted else ["`make` without a target"]
        elif head == "runway" or head.endswith("/runway"):
            called = " ".join([a for a in args if not a.startswith("$")][:2])
            group = called.split(" ")[0]
            if any(c.startswith(f"{group} ") for c in subcommands):  # `runway store relocate`
                problems += [] if called in subcommands else [f"no `runway {called}`"]
            else:
                problems += [] if group in subcommands else [f"no `runway {group}`"]
        elif head not in SHELL_COMMANDS:
            problems.append(f"`{head}` is not an allowed command")
    return problems


def test_unknown_commands_are_found():
    targets, subcommands = {"retrain", "test"}, {"retrain", "store", "store relocate"}
    script = """
    make retrain && make nosuch
    runway retrain --set a=1 && runway nosuch && runway store nosuch && runway store relocate
    if curl -s x | sh; then echo ok; fi
    """
    assert unknown_commands(script, targets, subcommands) == [
        "no Makefile target 'nosuch'",
        "no `runway nosuch`",
        "no `runway store nosuch`",
        "`curl` is not an allowed command",
        "`sh` is not an allowed command",
    ]


@pytest.mark.parametrize("name, script", list(run_scripts()), ids=lambda v: str(v)[:50])
def test_run_steps_call_only_commands_that_exist(name, script):
    """`make retrain` and `runway retrain` included: the real Makefile and `runway` app."""
    problems = unknown_commands(script, make_targets(), runway_commands())
    assert not problems, f"{name}: " + "; ".join(problems)
