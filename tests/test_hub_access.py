"""`nexus push` offline or without a token: one line naming what to do, exit code 2, nothing uploaded.

No network is touched: the token lookup, the TCP connection and ``whoami`` are monkeypatched.
"""

import socket

import pytest
import typer
from conftest import char_tokenizer, tiny_teacher
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.hub import hub_access
from nexus.hub.export import export_checkpoint
from nexus.hub.hub_access import HubTokenMissing, HubUnreachable, check_hub_access
from nexus.hub.push import push_folder
from nexus.push_command import push
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    src = root / "src"
    nexus_from_teacher(tiny_teacher("llama")).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    export_checkpoint(src, root / "out")
    return root / "out"


@pytest.fixture
def no_network(monkeypatch):
    """Every TCP connection fails as it does on a machine without DNS; records the attempts."""
    attempts = []

    def refuse(address, timeout=None, *a, **kw):
        attempts.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hub_access.socket, "create_connection", refuse)
    return attempts


def _token(monkeypatch, value):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: value)


def _forbid_uploads(monkeypatch):
    def upload(*a, **kw):
        raise AssertionError("an upload was attempted")

    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(f"huggingface_hub.HfApi.{name}", upload)


def test_no_token_is_one_line_before_any_connection(monkeypatch, no_network, exported):
    _token(monkeypatch, None)
    _forbid_uploads(monkeypatch)
    with pytest.raises(HubTokenMissing, match="no Hugging Face token found: run `hf auth login`"):
        push_folder(exported, "me/nexus-tiny")
    assert no_network == []  # the token is checked first


def test_offline_is_one_line_naming_the_endpoint(monkeypatch, no_network, exported):
    _token(monkeypatch, "hf_fake")
    _forbid_uploads(monkeypatch)
    with pytest.raises(HubUnreachable, match=r"cannot reach https://huggingface.co \(huggingface.co:443: "
                                             r"Name or service not known\)"):
        push_folder(exported, "me/nexus-tiny")
    assert no_network == [("huggingface.co", 443)]


def test_hf_hub_offline_is_refused_without_connecting(monkeypatch, no_network):
    _token(monkeypatch, "hf_fake")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE is set"):
        check_hub_access()
    assert no_network == []


class _Rejected(Exception):
    class response:  # what huggingface_hub's HTTP errors carry
        status_code = 401


def test_rejected_token_and_a_failing_whoami_are_one_line(monkeypatch):
    _token(monkeypatch, "hf_fake")
    monkeypatch.setattr(hub_access.socket, "create_connection", lambda *a, **kw: socket.socket())

    def rejected(self, token=None):
        raise _Rejected("401 Client Error\nlong body\nmore")

    monkeypatch.setattr("huggingface_hub.HfApi.whoami", rejected)
    with pytest.raises(HubTokenMissing, match=r"token was rejected by https://huggingface.co \(HTTP 401\)"):
        check_hub_access()

    def broken(self, token=None):
        raise RuntimeError("proxy said no\nsecond line")

    monkeypatch.setattr("huggingface_hub.HfApi.whoami", broken)
    with pytest.raises(HubUnreachable) as info:
        check_hub_access()
    assert str(info.value) == "https://huggingface.co did not answer the token check: RuntimeError: proxy said no"

    monkeypatch.setattr("huggingface_hub.HfApi.whoami", lambda self, token=None: {"name": "me"})
    assert check_hub_access() == "me"


@pytest.mark.parametrize("token, needle", [(None, "no Hugging Face token found"), ("hf_fake", "cannot reach")])
def test_cli_push_prints_one_error_line_and_exits_2(monkeypatch, no_network, exported, token, needle):
    _token(monkeypatch, token)
    _forbid_uploads(monkeypatch)
    app = typer.Typer()
    app.command("push")(push)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the subcommand name
    result = CliRunner().invoke(app, ["push", str(exported), "me/nexus-tiny"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert "Traceback" not in result.output
