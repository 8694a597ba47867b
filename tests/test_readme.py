"""README's quick start: the server's embedded defaults, and every curl example as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from support import ROOT, ServerProcess, launch, request

README = (ROOT / "README.md").read_text()


def test_quick_start_is_make_run_then_make_test() -> None:
    start = README.index("```")
    block = README[start:README.index("```", start + 3)]
    assert [line for line in block.splitlines()[1:] if line.strip()] == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: .*\n\t\$\(BIN\)/python -m tfserver$", makefile, re.M)
    assert re.search(r"^test: ", makefile, re.M)


def curl_examples() -> list[list[str]]:
    """The curl commands of the walkthrough after the quick start, as argument lists."""
    section = README[README.index("In another terminal"):README.index("## API")]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("curl "):
                commands.append(shlex.split(line))
    return commands


def as_request(argv: list[str]) -> tuple[str, str, dict[str, str], bytes | None]:
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
        elif arg.startswith("http"):
            url = arg
        i += 1
    assert url.startswith("http://127.0.0.1:8000"), url
    return method, url.removeprefix("http://127.0.0.1:8000"), headers, data


def start_defaults(cwd: Path) -> ServerProcess:
    """`python -m tfserver` as `make run` starts it: no settings but a free port, in a
    working directory that holds the repo's `modules/` (the default modules folder)."""
    shutil.copytree(ROOT / "modules", cwd / "modules")
    srv = launch([sys.executable, "-m", "tfserver", "--port", "0"], cwd=cwd,
                 env={"PATH": os.environ["PATH"], "HOME": str(cwd)})
    assert srv.url.startswith("http://127.0.0.1:"), srv.log_text()
    deadline = time.monotonic() + 30
    while srv.request("GET", "/demo").status != 200:  # droplet cannot init offline
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return srv


def test_every_curl_example_works_on_the_embedded_defaults(tmp: Path) -> None:
    srv = start_defaults(tmp)
    try:
        examples = curl_examples()
        assert len(examples) >= 9
        for argv in examples[:-1]:
            method, path, headers, data = as_request(argv)
            r = request(srv.url, method, path, headers=headers, raw=data)
            assert 200 <= r.status < 300, (argv, r.body)
        # the last example is the documented 400, shown with its exact answer
        method, path, headers, data = as_request(examples[-1])
        r = request(srv.url, method, path, headers=headers, raw=data)
        shown = json.loads(re.search(r"```json\n(.*?)```", README, re.S).group(1))
        assert r.status == 400 and r.json == shown
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
        records = srv.log_records()
        assert not [r for r in records if r.get("level") in ("error", "critical")], records
        assert "Traceback" not in srv.log_text()
        warning = next(r["message"] for r in records if "cannot be served yet" in
                       r.get("message", ""))
        assert "TFSERVER_PROVIDER_MIRROR" in warning
    finally:
        assert srv.stop(timeout=30) == 0  # SIGTERM; killed if it does not stop


def runs_examples() -> list[list[str]]:
    """The curl commands of README's Runs section, as argument lists."""
    section = README[README.index("## Runs"):README.index("### The command-line client")]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0].replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in block.splitlines()
            if line.strip().startswith("curl ")]


def test_the_runs_examples_work_as_written(tmp: Path) -> None:
    srv = start_defaults(tmp)
    try:
        ids: dict[str, str] = {}
        statuses = []
        for argv in runs_examples():
            argv = [a.replace("$RUN", ids.get("RUN", "")).replace("$PLAN", ids.get("PLAN", ""))
                    for a in argv]
            method, path, headers, data = as_request(argv)
            r = request(srv.url, method, path, headers=headers, raw=data)
            statuses.append(r.status)
            if "RUN" not in ids:
                ids["RUN"] = r.json["id"]
            elif "dry_run=true" in path:
                ids["PLAN"] = r.json["run_id"]
        assert statuses == [202, 200, 200, 200, 200, 200, 409, 200, 200, 200, 200], statuses
    finally:
        assert srv.stop(timeout=30) == 0  # SIGTERM; killed if it does not stop
