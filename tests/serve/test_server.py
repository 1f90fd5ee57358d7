"""`mtplab serve` as a user runs it: a one-line error for bad input, a working server otherwise."""

import re
import signal
import socket
import subprocess
import sys

import httpx
import openai

from mtplab.cli import main


def one_line_error(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtplab: error:") and "Traceback" not in err[0], err
    return err[0]


def test_missing_checkpoint(capsys, tmp_path):
    assert "no checkpoint directory" in one_line_error(capsys, "serve", str(tmp_path / "nope"), "--port", "0")


def test_port_in_use(capsys, tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"port {port} on 127.0.0.1 is in use" in one_line_error(capsys, "serve", str(tiny[2]),
                                                                       "--port", str(port))


def test_bad_options(capsys, tiny):
    assert "port must be" in one_line_error(capsys, "serve", str(tiny[2]), "--port", "70000")
    assert "--max-queue" in one_line_error(capsys, "serve", str(tiny[2]), "--port", "0", "--max-queue", "-1")
    assert "--max-batch must be >= 1, got 0" in one_line_error(capsys, "serve", str(tiny[2]), "--port", "0",
                                                                "--max-batch", "0")
    assert "--max-body-bytes must be > 0, got 0" in one_line_error(capsys, "serve", str(tiny[2]), "--port", "0",
                                                                   "--max-body-bytes", "0")
    assert "--header-timeout must be > 0" in one_line_error(capsys, "serve", str(tiny[2]), "--port", "0",
                                                            "--header-timeout", "-1")
    assert "cannot resolve host" in one_line_error(capsys, "serve", str(tiny[2]), "--port", "0",
                                                   "--host", "no such host.invalid")


def test_the_console_command_serves_until_ctrl_c(tiny):
    proc = subprocess.Popen([sys.executable, "-m", "mtplab", "serve", str(tiny[2]), "--port", "0",
                             "--api-key", "k", "--model-name", "tiny-cli", "--max-batch", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", banner).group(0)  # loopback unless told otherwise
        health = httpx.get(url + "health", timeout=10).json()
        assert health["model"] == "tiny-cli" and health["max_batch"] == 1  # one request at a time
        answer = openai.OpenAI(base_url=url + "v1", api_key="k", max_retries=0).chat.completions.create(
            model="tiny-cli", messages=[{"role": "user", "content": "Ava has 3 apples."}], max_tokens=4)
        assert answer.choices[0].message.content
        assert httpx.get(url + "v1/models", timeout=10).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err, err  # Ctrl-C, as every command
