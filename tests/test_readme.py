"""README's quick start, and every curl example of README.md and docs/ as written, against
the server's embedded defaults (what `make run` starts)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, ServerProcess, launch, request

README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LOCAL = "http://127.0.0.1:8000"
NOT_RUN = re.compile(r"^<!-- not run: \S.* -->$")


def test_quick_start_is_make_run_then_make_test() -> None:
    start = README.index("```")
    block = README[start:README.index("```", start + 3)]
    assert [line for line in block.splitlines()[1:] if line.strip()] == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: .*\n\t\$\(BIN\)/python -m tfserver$", makefile, re.M)
    assert re.search(r"^test: ", makefile, re.M)


# -- reading the examples ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced block of a page: its language, its lines, whether the line before it says
    `<!-- not run: why -->`, and the JSON block that follows it at once (its answer)."""

    lang: str
    lines: tuple[str, ...]
    not_run: bool
    shown: Any


@dataclass(frozen=True)
class Example:
    """One curl command of a page: its arguments, the variable its answer sets
    (`RUN=$(curl ... | jq -r .id)`: ("RUN", "id")), and the answer shown for it."""

    argv: tuple[str, ...]
    binds: tuple[str, str] | None
    shown: Any


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text (fences may be indented, as in lists)."""
    lines = text.splitlines()
    found: list[tuple[str, list[str], bool, int]] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        end = i + 1
        while lines[end].strip() != "```":
            end += 1
        found.append((fence[3:].strip(), lines[i + 1:end], bool(NOT_RUN.match(before)), end))
        i = end + 1
    result = []
    for n, (lang, body, not_run, end) in enumerate(found):
        shown = None
        after = found[n + 1] if n + 1 < len(found) else None
        # the next block is this one's answer when nothing but its fence stands between
        if after and after[0] == "json" and lines[end + 1].strip() == "```json":
            shown = json.loads("\n".join(after[1]))
        result.append(Block(lang, tuple(body), not_run, shown))
    return result


def commands(block: Block) -> list[str]:
    """A shell block's command lines (continuations joined; in a console block, the lines
    after a `$ ` prompt)."""
    text = "\n".join(line.strip() for line in block.lines).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    if block.lang == "console":
        return [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line and not line.startswith("#")]


def curl_lines(page: Path) -> tuple[list[Example], list[str]]:
    """A page's curl examples against the local server, in order, and the curl lines of
    unmarked blocks that aim anywhere else (none may)."""
    run, elsewhere = [], []
    for block in blocks(page.read_text()):
        if block.lang not in ("sh", "console") or block.not_run:
            continue
        curls = [c for c in commands(block) if re.match(r"(\w+=\$\()?curl ", c)]
        for n, line in enumerate(curls):
            binds = None
            if assigned := re.fullmatch(r"(\w+)=\$\((.*)\)", line):
                name, line = assigned.groups()
                jq = re.search(r"\| *jq -r \.(\w+)$", line)
                assert jq, line
                binds = (name, jq.group(1))
            argv = shlex.split(line, comments=True)
            if "|" in argv:  # what the reader pipes the answer into
                argv = argv[:argv.index("|")]
            if not any(a.startswith(LOCAL) for a in argv):
                elsewhere.append(line)
                continue
            run.append(Example(tuple(argv), binds, block.shown if n == len(curls) - 1
                               else None))
    return run, elsewhere


def as_request(argv: tuple[str, ...]) -> tuple[str, str, dict[str, str], bytes | None]:
    method, headers, data, url = "GET", {}, None, ""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-X":
            method, i = argv[i + 1], i + 1
        elif arg == "-H":
            key, _, value = argv[i + 1].partition(": ")
            headers[key], i = value, i + 1
        elif arg == "-d":
            data, i = argv[i + 1].encode(), i + 1
            method = "POST" if method == "GET" else method
        elif arg == "-o":  # where the reader keeps the answer
            i += 1
        elif arg.startswith("http"):
            url = arg
        i += 1
    assert url.startswith(LOCAL), url
    return method, url.removeprefix(LOCAL), headers, data


# -- running them ---------------------------------------------------------------------------


def start_defaults(cwd: Path) -> ServerProcess:
    """`python -m tfserver` as `make run` starts it: no settings but a free port, in a
    working directory that holds the repo's `modules/` (the default modules folder)."""
    shutil.copytree(ROOT / "modules", cwd / "modules")
    # PYTHONPATH: this checkout's package, not the one the venv was installed from (a
    # git worktree shares the main checkout's venv); still no tfserver setting.
    srv = launch([sys.executable, "-m", "tfserver", "--port", "0"], cwd=cwd,
                 env={"PATH": os.environ["PATH"], "HOME": str(cwd), "PYTHONPATH": str(ROOT)})
    assert srv.url.startswith("http://127.0.0.1:"), srv.log_text()
    deadline = time.monotonic() + 30
    while srv.request("GET", "/demo").status != 200:  # droplet cannot init offline
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return srv


def run_examples(srv: ServerProcess, examples: list[Example]) -> list[int]:
    """Every example in order, `$NAME`s filled in; its status each. `$RUN` is what a
    `RUN=$(...)` line kept, else the `id` of the last 202 answer; `$PLAN` the `run_id` of
    the last dry run. An example with an answer shown after it answers exactly that;
    any other answers 2xx unless the caller says otherwise."""
    names: dict[str, str] = {}
    statuses = []
    for example in examples:
        argv = list(example.argv)
        for name, value in names.items():
            argv = [a.replace(f"${name}", value) for a in argv]
        assert not [a for a in argv if re.search(r"\$[A-Z]", a)], (example.argv, names)
        method, path, headers, data = as_request(tuple(argv))
        r = request(srv.url, method, path, headers=headers, raw=data)
        statuses.append(r.status)
        if example.shown is not None:
            assert r.status == example.shown.get("status", 200), (argv, r.body)
            assert r.json == example.shown, (argv, r.body)
        answer = r.json if r.header("Content-Type") in ("application/json",
                                                         "application/problem+json") else {}
        if example.binds:
            names[example.binds[0]] = answer[example.binds[1]]
        elif r.status == 202 and "id" in answer:
            names["RUN"] = answer["id"]
        if "dry_run=true" in path and "run_id" in answer:
            names["PLAN"] = answer["run_id"]
    return statuses


#: Pages whose examples answer more than 2xx (the Runs page's cancel of an ended run).
STATUSES = {
    "runs.md": [202, 200, 200, 200, 200, 200, 409, 200, 200, 200, 200,
                201, 200, 200, 202],  # and the drift checks
}


def test_every_curl_example_of_the_readme_works_on_the_embedded_defaults(tmp: Path) -> None:
    examples, _ = curl_lines(ROOT / "README.md")
    assert len(examples) >= 9
    # the last example is the documented 400, shown with its exact answer
    shown = json.loads(re.search(r"```json\n(.*?)```", README, re.S).group(1))
    assert examples[-1].shown == shown and shown["status"] == 400
    srv = start_defaults(tmp)
    try:
        statuses = run_examples(srv, examples)
        assert all(200 <= s < 300 for s in statuses[:-1]), statuses
        # the defaults: local state under ./.tfserver, ./modules
        assert (tmp / ".tfserver" / "work" / "demo").is_dir()
        # ready means "can serve": the droplet module (no provider offline) is named as
        # failed, and answers 503 on its own; the start logged no error and no traceback
        deadline = time.monotonic() + 60
        while (ready := srv.request("GET", "/readyz")).status != 200:
            assert time.monotonic() < deadline, ready.body
            time.sleep(0.1)
        assert ready.json["modules"]["demo"] == "ready"
        assert ready.json["modules"]["droplet"].startswith("failed: Error: ")
        assert srv.request("PUT", "/droplet/x", {"name": "x", "image": "i", "region": "r",
                                                  "size": "s"}).status == 503
        warnings = srv.records(lambda r: "cannot be served yet" in r.get("message", ""))
        assert warnings and "TFSERVER_PROVIDER_MIRROR" in warnings[0]["message"], warnings
        records = srv.log_records()
        assert not [r for r in records if r.get("level") in ("error", "critical")], records
        assert "Traceback" not in srv.log_text()
    finally:
        assert srv.stop(timeout=30) == 0  # SIGTERM; killed if it does not stop


def test_the_docs_have_their_pages() -> None:
    assert {p.name for p in PAGES} >= {"README.md", "api.md", "runs.md", "governance.md",
                                       "operations.md", "deploy.md", "configuration.md",
                                       "development.md"}
    # README is the front door: short, and a link to every page of the reference
    assert len(README.splitlines()) <= 300
    assert not [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in README]
    for page in PAGES:  # every link between the pages leads to a page and heading that exist
        for target, anchor in re.findall(r"\]\(([^)#:]+\.md)(?:#([^)]*))?\)", page.read_text()):
            assert (page.parent / target).is_file(), (page.name, target)
            if anchor:
                assert anchor in anchors((page.parent / target).read_text()), (page.name, anchor)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped)."""
    found, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.strip().startswith("```")
        if not fenced and (head := re.match(r"#+ (.+)$", line)):
            found.add(re.sub(r"[^\w\- ]", "", head.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_no_example_aims_elsewhere_unmarked() -> None:
    """A block that needs a token, S3 or a cloud says so (`<!-- not run: why -->` on the
    line before it), so every other curl example is one the tests run."""
    for page in PAGES:
        _, elsewhere = curl_lines(page)
        assert not elsewhere, f"{page.name}: mark these blocks <!-- not run: ... -->: {elsewhere}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"
                                  and curl_lines(p)[0]], ids=lambda p: p.name)
def test_every_curl_example_of_the_docs_works_as_written(page: Path, tmp: Path) -> None:
    examples, _ = curl_lines(page)
    srv = start_defaults(tmp)
    try:
        statuses = run_examples(srv, examples)
        expected = STATUSES.get(page.name)
        if expected is not None:
            assert statuses == expected, statuses
        else:
            assert all(200 <= s < 300 or e.shown for s, e in zip(statuses, examples,
                                                                 strict=True)), statuses
        assert "Traceback" not in srv.log_text()
    finally:
        assert srv.stop(timeout=30) == 0  # SIGTERM; killed if it does not stop


def test_the_runs_examples_are_the_runs_page() -> None:
    """The Runs page's first block is the walkthrough its statuses above describe."""
    examples, _ = curl_lines(ROOT / "docs" / "runs.md")
    assert len(examples) == len(STATUSES["runs.md"])
    assert examples[0].argv[:4] == ("curl", "-s", "-X", "PUT")
    assert "Prefer: respond-async" in examples[0].argv
