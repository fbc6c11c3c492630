"""README.md, followed as a newcomer would: its marked shell and Python blocks, in order, against a real stack.

Every ``sh`` and ``python`` block of README carries an HTML comment just above it:

* ``<!-- run: stack -->``: runs against ``inferq up``, which this test starts as ``make run`` would;
* ``<!-- run -->``: runs as is, with or without the stack;
* ``<!-- not run: reason -->``: cannot run here (Docker, a GPU, commands that stop shared services);

with optional ``<!-- expect: "text" -->`` lines (the output must contain each) and ``<!-- exit: N -->``
(the block's exit status, 0 by default).

The blocks run in a scratch folder that looks like a fresh clone where ``make run`` has built the venv:
``.venv`` links to this interpreter's venv, ``models/`` starts empty (so ``inferq up`` writes the demo
models, as in a fresh clone) and ``.state/`` is the stack's. The venv is not on the ``PATH`` and no
``INFERQ_*`` variable is set except ``INFERQ_NAMESPACE``, a namespace of this test's own. The README's
URLs name ports 8000 and 8001, so the stack listens there; the test fails at once if either is taken.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from inferq.runtime.loader import remove_namespace
from inferq.settings import Settings
from tests.support import ROOT

pytestmark = pytest.mark.timeout(300)

README = ROOT / "README.md"
PORTS = (8000, 8001)
COMMAND_LANGS = {"sh", "bash", "python"}
BLOCK_TIMEOUT_S = 90
READY_TIMEOUT_S = 120
_COMMENT = re.compile(r"^<!--\s*(.*?)\s*-->$")
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of README and what its markers say about it."""

    line: int
    lang: str
    code: str
    run: str | None = None  # "stack", "here", or None when not run
    reason: str = ""
    expects: tuple[str, ...] = ()
    exit: int = 0

    def __str__(self) -> str:
        return f"README.md line {self.line} ({self.lang})"


def _markers(comments: list[str], block: Block) -> Block:
    for text in comments:
        if text in ("run", "run: stack"):
            block = replace(block, run="stack" if text.endswith("stack") else "here")
        elif text.startswith("not run:"):
            block = replace(block, reason=text.removeprefix("not run:").strip())
        elif text.startswith("expect:"):
            block = replace(block, expects=(*block.expects, json.loads(text.removeprefix("expect:").strip())))
        elif text.startswith("exit:"):
            block = replace(block, exit=int(text.removeprefix("exit:")))
        else:
            raise AssertionError(f"line {block.line}: unknown README marker <!-- {text} -->")
    return block


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, with the markers of the comment lines right above its opening fence."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, end = i, next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        comments, k = [], start - 1
        while k >= 0 and _COMMENT.match(lines[k]):
            comments.insert(0, _COMMENT.match(lines[k]).group(1))
            k -= 1
        blocks.append(_markers(comments, Block(start + 1, match.group(1), "\n".join(lines[start + 1:end]) + "\n")))
        i = end + 1
    return blocks


def command_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text()) if b.lang in COMMAND_LANGS]


def test_every_command_block_of_the_readme_says_whether_and_how_it_runs() -> None:
    blocks = command_blocks()
    assert len(blocks) >= 10
    unmarked = [str(b) for b in blocks if b.run is None and not b.reason]
    assert not unmarked, f"mark these with <!-- run: stack -->, <!-- run --> or <!-- not run: reason -->: {unmarked}"
    both = [str(b) for b in blocks if b.run and b.reason]
    assert not both, f"blocks marked both run and not run: {both}"
    assert sum(b.run is not None for b in blocks) >= 10, "most examples run"


def test_the_marker_parser_reads_expectations_and_exit_codes() -> None:
    text = '<!-- run: stack -->\n<!-- expect: "a \\"b\\"" -->\n<!-- exit: 2 -->\n```sh\necho\n```\n\n```json\n{}\n```\n'
    run, data = readme_blocks(text)
    assert (run.run, run.expects, run.exit, run.code, run.line) == ("stack", ('a "b"',), 2, "echo\n", 4)
    assert (data.lang, data.run, data.reason) == ("json", None, "")


@dataclass
class Newcomer:
    """The scratch checkout the blocks run in, its environment, and the stack once started."""

    root: Path
    env: dict[str, str]
    namespace: str
    stack: subprocess.Popen | None = None
    stack_log: Path | None = None
    ran: list[str] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.root / ".shell-state"

    def start_stack(self) -> None:
        self.stack_log = self.root / "inferq-up.out"
        with open(self.stack_log, "wb") as out:
            self.stack = subprocess.Popen([str(self.root / ".venv/bin/inferq"), "up"], cwd=self.root, env=self.env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "inferq is up: http://127.0.0.1:8000" not in self.stack_output():
            assert self.stack.poll() is None, f"inferq up exited with {self.stack.returncode}:\n{self.stack_output()}"
            assert time.monotonic() < deadline, f"inferq up did not print its banner in {READY_TIMEOUT_S}s:\n{self.stack_output()}"
            time.sleep(0.2)

    def stack_output(self) -> str:
        return self.stack_log.read_text(errors="replace") if self.stack_log else ""

    def stop_stack(self) -> int | None:
        if self.stack is None or self.stack.poll() is not None:
            return None if self.stack is None else self.stack.returncode
        self.stack.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            return self.stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.stack.pid, signal.SIGKILL)
            self.stack.wait(10)
            raise

    def run(self, block: Block) -> subprocess.CompletedProcess:
        if block.lang == "python":
            argv, stdin = [str(self.root / ".venv/bin/python"), "-"], block.code
        else:
            argv, stdin = ["bash", "-c", self._shell(block.code)], None
        return subprocess.run(argv, cwd=self.root, env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)

    def _shell(self, code: str) -> str:
        # A fresh bash per block, keeping the variables that the blocks before it set (URL, BODY, JOB, ...).
        baseline = self.root / ".shell-baseline"
        if not baseline.exists():
            names = subprocess.run(["bash", "-c", "compgen -v"], env=self.env, capture_output=True, text=True).stdout
            baseline.write_text(names + "names\n")
        return (f"[ -f {self.state} ] && source {self.state}\n"
                f"trap 'names=$(compgen -v | grep -vxF -f {baseline}); "
                f"[ -n \"$names\" ] && declare -p $names > {self.state}' EXIT\n"
                f"set -e -o pipefail\n{code}")


def newcomer_env(namespace: str) -> dict[str, str]:
    """Our environment as a new user's shell would have it: no venv on the PATH, no INFERQ_* settings."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["INFERQ_NAMESPACE"] = namespace
    return env


def ports_in_use() -> list[int]:
    from inferq.runtime.services import reachable

    return [p for p in PORTS if reachable("127.0.0.1", p)]


@pytest.fixture
def newcomer(tmp_path: Path) -> Iterator[Newcomer]:
    taken = ports_in_use()
    if taken:
        pytest.fail(f"port(s) {taken} are in use: README's examples name 127.0.0.1:8000 and :8001, so this test needs "
                    "them free (stop the stack that holds them, e.g. `make run` in another terminal)")
    assert Path(sys.prefix, "bin", "inferq").exists(), "run the tests with the venv's Python (make test)"
    (tmp_path / ".venv").symlink_to(sys.prefix)
    me = Newcomer(tmp_path, newcomer_env(f"t{uuid.uuid4().hex[:8]}rd"), "")
    me.namespace = me.env["INFERQ_NAMESPACE"]
    try:
        yield me
    finally:
        me.stop_stack()
        settings = Settings(namespace=me.namespace, model_repository=tmp_path / "models", state_dir=tmp_path / ".state")
        asyncio.run(asyncio.wait_for(remove_namespace(settings), 60))  # bounded: a hung broker must not hang the suite


def test_the_readme_examples_run_as_written_against_a_fresh_stack(newcomer: Newcomer) -> None:
    started = time.monotonic()
    for block in command_blocks():
        if block.run is None:
            continue
        if block.run == "stack" and newcomer.stack is None:
            newcomer.start_stack()
        done = newcomer.run(block)
        output = done.stdout + done.stderr
        context = f"{block} exited {done.returncode}\n--- block ---\n{block.code}--- output ---\n{output[-4000:]}"
        if newcomer.stack is not None:
            context += f"\n--- inferq up, last lines ---\n{newcomer.stack_output()[-2000:]}"
        assert done.returncode == block.exit, context
        for text in block.expects:
            assert text in output, f"{block} did not print {text!r}\n{context}"
        newcomer.ran.append(str(block))
    assert newcomer.stack is not None and len(newcomer.ran) >= 10
    assert newcomer.stop_stack() == 0, f"README: Ctrl-C stops everything and exits 0\n{newcomer.stack_output()[-2000:]}"
    assert "inferq.up: stopped" in newcomer.stack_output()
    assert f"The CLI is {newcomer.root / '.venv/bin/inferq'} (not on your PATH" in newcomer.stack_output()
    assert not (ROOT / "job.msgpack").exists() and not (ROOT / "result.msgpack").exists()
    print(f"{len(newcomer.ran)} README blocks ran in {time.monotonic() - started:.0f}s")
