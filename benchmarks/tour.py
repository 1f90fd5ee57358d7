"""Run the README's tour: every command of its "Tour" section, in order, as a new user would.

    python benchmarks/tour.py            # or: make tour (after make demo)
    python benchmarks/tour.py --list     # what would run and what is skipped, without running

The ```bash blocks of README.md's "## Tour" section are split into commands (continuation lines,
quoted strings and here-documents kept whole) and run one by one with bash from the repository
root, the virtual environment first on PATH (as `source .venv/bin/activate` would), stdin empty (so
`mtplab chat` meets end-of-input at once, as Ctrl-D). A `cd` inside a block holds for the rest of
that block; each block starts again at the root. ```python blocks run as one `python -` each. In a
block written as a transcript (`$ command` lines followed by what it prints) the output must be the
printed text. `mtplab serve ...` starts in the background; the tour waits for its `/health` and
stops it where its README section ends, so the section's clients (curl, the openai snippet) talk to
it. A block that runs `pip install .` gets a virtual environment of its own that sees the
repository environment's packages, so that the repository's editable install is left as it is.

A command whose comment says `needs:` (the user's own files, a GPU, several machines, or more time
than the tour takes) is skipped and listed at the end with its reason; everything else must pass:
the tour stops at the first command that fails, printing it and the tail of its output.

It runs in a scratch copy of the working tree (the files git tracks or would track, `.venv` linked,
`runs/demo` copied, `../shared` linked when it exists), so it can be re-run and leaves the
repository untouched. The copy is removed after a pass (`--keep` keeps it) and kept after a failure;
`--root DIR --from N` reruns from command N in a kept copy.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(?:^|\s)#\s*needs:\s*(.*)$")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


@dataclass
class Command:
    section: str
    block: int  # index of its code block in the tour
    kind: str  # "bash", "python", "transcript", "serve"
    text: str
    expect: str = ""  # transcript: what the command prints
    skip: str = ""  # the `needs:` reason, when skipped
    number: int = 0

    @property
    def first_line(self) -> str:
        return self.text.strip().splitlines()[0]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    section: str
    log: Path
    command: str = field(default="")


def tour_text(readme: str) -> str:
    match = re.search(r"^## Tour\n(.*?)(?=^## )", readme, re.S | re.M)
    if not match:
        raise SystemExit("tour: README.md has no '## Tour' section")
    return match.group(1)


def complete(text: str) -> bool:
    """Whether `text` is a whole shell command: no trailing backslash, open quote or here-document."""
    if text.endswith("\\"):
        return False
    lines = text.split("\n")
    for i, line in enumerate(lines):
        for m in HEREDOC.finditer(line):
            if m.group(2) not in (x.strip() for x in lines[i + 1:]):
                return False  # the here-document's end is still to come
            text = "\n".join(lines[:i + 1])  # its body is data, not shell words
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an unclosed quote: the string goes on on the next line
        return False
    return True


def split_commands(block: str) -> list[str]:
    commands, current = [], []
    for line in block.split("\n"):
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue  # blank lines and comment lines between commands
        current.append(line)
        if complete("\n".join(current).rstrip()):
            commands.append("\n".join(current).rstrip())
            current = []
    if current:
        raise SystemExit(f"tour: an unfinished command in the README:\n{chr(10).join(current)}")
    return commands


def reason(text: str) -> str:
    for line in text.split("\n"):
        m = MARKER.search(line)
        if m:
            return m.group(1).strip()
    return ""


def parse(readme: str) -> list[Command]:
    commands, section = [], "Tour"
    lines, i, block = tour_text(readme).split("\n"), 0, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            section = line[4:].strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if not fence:
            i += 1
            continue
        lang, body = fence.group(1), []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        text = "\n".join(body)
        if lang == "python":
            commands.append(Command(section, block, "python", text, skip=reason(body[0]) if body else ""))
        elif lang == "bash" and any(b.startswith("$ ") for b in body):
            for chunk in re.split(r"^\$ ", text, flags=re.M)[1:]:
                cmd, _, expect = chunk.partition("\n")
                commands.append(Command(section, block, "transcript", cmd, expect=expect.strip()))
        elif lang == "bash":
            for cmd in split_commands(text):
                kind = "serve" if re.match(r"^(\w+=\S+\s+)*mtplab serve\b", cmd) else "bash"
                commands.append(Command(section, block, kind, cmd, skip=reason(cmd)))
        block += 1 if lang in ("bash", "python") else 0
    for n, c in enumerate(commands, 1):
        c.number = n
    return commands


def scratch_copy(base: Path) -> Path:
    """A copy of the working tree as a fresh clone after `make demo` would have it."""
    root = base / ROOT.name
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = ROOT / name, root / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    (root / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(ROOT / "runs" / "demo", root / "runs" / "demo")
    if (ROOT.parent / "shared").exists():  # the README's ../shared/data
        (base / "shared").symlink_to((ROOT.parent / "shared").resolve())
    return root


def package_venv(base: Path) -> Path:
    """A virtual environment of its own for `pip install .`, seeing the repository venv's packages."""
    venv = base / "package-venv"
    if not venv.exists():
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "venv", str(venv)], check=True)
        purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        (Path(purelib) / "_tour_repository_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def environment(root: Path, venv: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    bins = ([str(venv / "bin")] if venv else []) + [str(root / ".venv" / "bin")]
    env["PATH"] = os.pathsep.join(bins + [env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(venv or root / ".venv")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def port_of(command: str) -> int:
    m = re.search(r"--port[ =](\d+)", command)
    return int(m.group(1)) if m else 8000


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--list", action="store_true", help="print the commands and what is skipped; run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy after a pass")
    parser.add_argument("--root", help="run in this kept scratch copy instead of a new one")
    parser.add_argument("--from", dest="start", type=int, default=1, help="start at command N (with --root)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds any one command may take")
    args = parser.parse_args()
    commands = parse(Path(args.readme).read_text())
    if args.list:
        for c in commands:
            mark = f"  [skipped: {c.skip}]" if c.skip else ""
            print(f"{c.number:3d} {c.kind:10s} {c.section[:28]:28s} {c.first_line[:100]}{mark}")
        return 0
    if not (ROOT / "runs" / "demo" / "model.safetensors").exists() or not (ROOT / ".venv").is_dir():
        print("tour: run `make demo` first (it makes .venv and runs/demo)", file=sys.stderr)
        return 2
    if args.root:
        root = Path(args.root).resolve()
        base = root.parent
    else:
        base = Path(tempfile.mkdtemp(prefix="mtplab-tour-"))
        root = scratch_copy(base)
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    print(f"tour: {sum(not c.skip for c in commands)} commands to run, {sum(bool(c.skip) for c in commands)} "
          f"marked `needs:`, in {root}", flush=True)
    servers: list[Server] = []
    t_start, cwd, block, failed = time.perf_counter(), root, -1, None
    try:
        for c in commands:
            for s in [s for s in servers if s.section != c.section]:  # its README section has ended
                stop(s)
                servers.remove(s)
            if c.block != block:
                block, cwd = c.block, root
            if c.number < args.start:
                continue
            head = f"[{c.number}/{len(commands)}] {c.section[:40]}: {c.first_line}"
            if c.skip:
                print(f"{head}\n    skipped (needs: {c.skip})", flush=True)
                continue
            print(head + ("" if "\n" not in c.text.strip() else " ..."), flush=True)
            venv = package_venv(base) if any("pip install ." in x.text for x in commands
                                             if x.block == c.block) else None
            env, log = environment(root, venv), logs / f"{c.number:03d}.log"
            t0 = time.perf_counter()
            if c.kind == "serve":
                port = port_of(c.text)
                if healthy(port):
                    failed = (c, f"port {port} is already serving: stop that server first", None)
                    break
                out = open(log, "w")
                proc = subprocess.Popen(["bash", "-c", c.text], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                servers.append(Server(proc, port, c.section, log, c.text))
                while not healthy(port) and proc.poll() is None and time.perf_counter() - t0 < 180:
                    time.sleep(0.5)
                if not healthy(port):
                    failed = (c, f"no /health on port {port} (exit code {proc.poll()})", log)
                    break
                print(f"    serving on port {port} ({time.perf_counter() - t0:.1f} s to /health)", flush=True)
                continue
            pwd_file = logs / "pwd"
            if c.kind == "python":
                argv, stdin = ["python", "-"], c.text
            else:
                script = f'set -o pipefail\n{c.text}\n__rc=$?\npwd > {shlex.quote(str(pwd_file))}\nexit $__rc\n'
                argv, stdin = ["bash", "-c", script], None
            with open(log, "w") as out:
                try:
                    done = subprocess.run(argv, cwd=cwd, env=env, input=stdin, text=True,
                                          stdin=None if stdin is not None else subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout)
                    rc = done.returncode
                except subprocess.TimeoutExpired:
                    rc = f"timed out after {args.timeout:.0f} s"
            seconds = time.perf_counter() - t0
            if c.kind == "bash" and pwd_file.exists():
                cwd = Path(pwd_file.read_text().strip())
                pwd_file.unlink()
            if c.kind == "transcript":
                got = log.read_text().strip()
                if got != c.expect:
                    failed = (c, f"printed\n{textwrap.indent(got, '    ')}\n  where the README shows\n"
                                 f"{textwrap.indent(c.expect, '    ')}", None)
                    break
            elif rc != 0:
                failed = (c, f"exit code {rc} after {seconds:.1f} s", log)
                break
            print(f"    ok {seconds:.1f} s", flush=True)
    finally:
        for s in servers:
            stop(s)
    wall = time.perf_counter() - t_start
    skipped = [c for c in commands if c.skip and c.number >= args.start]
    if skipped:
        print(f"\nskipped ({len(skipped)}, marked `needs:` in the README):")
        for c in skipped:
            print(f"  {c.number:3d} {c.first_line[:90]}\n        needs: {c.skip}")
    if failed:
        c, why, log = failed
        print(f"\ntour FAILED at command {c.number} ({c.section}) after {wall:.0f} s:\n"
              f"{textwrap.indent(c.text, '  $ ')}\n  {why}", file=sys.stderr)
        if log is not None:
            print(f"  output (last 40 lines; all of it in {log}):\n{textwrap.indent(tail(log), '    ')}",
                  file=sys.stderr)
        print(f"  the scratch copy is kept: {root} (rerun from here: --root {root} --from {c.number})",
              file=sys.stderr)
        return 1
    print(f"\ntour passed: {sum(not c.skip for c in commands if c.number >= args.start)} commands in "
          f"{wall:.0f} s ({wall / 60:.1f} min)")
    if args.keep or args.root:
        print(f"scratch copy kept: {root}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
