"""Shared test setup: one CPU thread, private caches, no tuned configs, an offline Hub."""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import pytest
import torch
from tiny import CHAT_TEMPLATE, tiny_model, tiny_tokenizer

import edit.config

# Models this small run far faster on one thread (see tiny.py); it also keeps the tests from
# competing with other work on a busy machine.
torch.set_num_threads(1)
_CPUS = os.cpu_count() or 1
_USER_ENV = {k: os.environ.get(k) for k in ("EDIT_CACHE", "EDIT_STATS_CACHE")}
_CONFIG_FILE = edit.config.config_file
_SOURCE_CONFIG_FILE = edit.config.source_config_file


def isolate(mp: pytest.MonkeyPatch, cache_dir) -> None:
    """Point every cache at ``cache_dir``, drop user settings (the signing key too), keep the
    Hub offline, and ignore tuned configs (tests pass their settings explicitly: a tuned
    ``configs/rome/llama.yaml``, matched by model type, must not change what they run)."""
    import huggingface_hub.constants

    mp.setenv("EDIT_CACHE", str(cache_dir))
    mp.delenv("EDIT_STATS_CACHE", raising=False)
    mp.delenv("EDIT_WORKSPACE", raising=False)
    mp.delenv("EDIT_SIGNING_KEY", raising=False)  # no user's signing key: changes unsigned
    mp.setenv("XDG_CONFIG_HOME", str(cache_dir / "config"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    # The constant is read once at import; huggingface_hub.is_offline_mode() reads it here.
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(edit.config, "config_file", lambda method, model: None)
    mp.setattr(edit.config, "source_config_file", lambda method, source: None)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """Also in force while module- and session-scoped fixtures are built."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, tmp_path_factory.mktemp("edit-cache-session"))
        yield


@pytest.fixture(autouse=True)
def _isolated_test(request, tmp_path_factory, monkeypatch):
    """Each test gets its own empty cache: nothing is written under ~/.cache."""
    if request.node.get_closest_marker("real_model"):
        return
    isolate(monkeypatch, tmp_path_factory.mktemp("edit-cache"))


@contextmanager
def real_environment():
    """What a user has, for the tests of the real default model: the user's caches (the
    dequantized model and the key statistics are reused across runs, as ``make demo`` does),
    the tuned configs, and every CPU core."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _USER_ENV.items():
            if value is None:
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, value)
        mp.setattr(edit.config, "config_file", _CONFIG_FILE)
        mp.setattr(edit.config, "source_config_file", _SOURCE_CONFIG_FILE)
        threads = torch.get_num_threads()
        torch.set_num_threads(_CPUS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def chat_tok(tok):
    """The tiny tokenizer with a chat template whose turns open with a special token."""
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture
def llama(tok):
    """A fresh tiny llama (seed 0), safe to edit."""
    return tiny_model("llama", len(tok))


@pytest.fixture
def model_dir(tmp_path, tok):
    """A fresh tiny llama (seed 0) and the tiny tokenizer saved as a model folder, for the
    CLI and the workspace (``-m model_dir``)."""
    model = tiny_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")
