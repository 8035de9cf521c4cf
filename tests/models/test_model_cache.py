"""The converted-model cache (issue 14 class 8): the conversion is atomic, a killed conversion's temporary
folder is removed by the next one, a folder without config.json is converted again, and a damaged cached
file is one line naming the folder to delete.

The expensive dequantisation is replaced by the tiny random Llama: what is tested is how the folder is
written, found and read, not the GGUF arithmetic (the real conversion runs in every SmolLM2 test).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reprpo_pl.models.loading as loading
from reprpo_pl.errors import UserError
from reprpo_pl.models.loading import SMOLLM2_GGUF, cache_dir, convert_gguf, load_base_model, remove_stale_conversions
from reprpo_pl.models.tiny import tiny_llama

REAL = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1"  # converted by the session's tokenizer fixture


class Cache(type(Path())):  # a Path with the list of the conversions done into it
    calls: list[Path]


@pytest.fixture
def cache(tmp_path, monkeypatch, tokenizer) -> Cache:
    """An empty cache whose conversions write the tiny model with the SmolLM2 tokenizer; ``calls`` lists them."""
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path))
    calls: list[Path] = []

    def dequantise(gguf):
        calls.append(gguf)
        return tiny_llama(vocab_size=len(tokenizer)), tokenizer

    monkeypatch.setattr(loading, "_dequantise", dequantise)
    root = Cache(tmp_path)
    root.calls = calls
    return root


def target(cache: Path) -> Path:
    return cache / "models" / REAL.name


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_converts_once_and_leaves_no_temporary_folder(cache):
    folder = convert_gguf(SMOLLM2_GGUF)
    assert folder == target(cache) and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert convert_gguf(SMOLLM2_GGUF) == folder and len(cache.calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [REAL.name]


def test_a_conversion_killed_while_saving_leaves_no_cache_and_the_next_one_converts(cache, monkeypatch):
    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(type(tiny_llama(vocab_size=8)), "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            convert_gguf(SMOLLM2_GGUF)
    assert not target(cache).exists() and list(target(cache).parent.iterdir()) == []
    assert (convert_gguf(SMOLLM2_GGUF) / "config.json").is_file()


def test_stale_temporary_folders_of_killed_conversions_are_removed(cache):
    models = cache / "models"
    models.mkdir()
    prefix = f".{REAL.name}.converting-"
    host = socket.gethostname()
    killed = models / f"{prefix}{host}-{dead_pid()}-abc"  # SIGKILLed: its process is gone
    running = models / f"{prefix}{host}-{os.getpid()}-def"  # a live conversion
    other_host = models / f"{prefix}elsewhere-{os.getpid()}-ghi"
    old_other_host = models / f"{prefix}elsewhere-1-jkl"
    earlier_version = models / f".{REAL.name}-mno"  # written by versions that did not record an owner
    recent_earlier_version = models / f".{REAL.name}-pqr"
    for folder in (killed, running, other_host, old_other_host, earlier_version, recent_earlier_version):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    day_ago = time.time() - 86400 - 60
    os.utime(old_other_host, (day_ago, day_ago))
    os.utime(earlier_version, (time.time() - 3700,) * 2)

    assert sorted(remove_stale_conversions(target(cache))) == sorted([killed, old_other_host, earlier_version])
    assert running.is_dir() and other_host.is_dir() and recent_earlier_version.is_dir()
    (running / "model.safetensors").unlink()
    running.rmdir()
    convert_gguf(SMOLLM2_GGUF)  # the next conversion cleans up as it starts
    assert not killed.exists()


def test_a_folder_without_config_json_is_converted_again(cache):
    broken = target(cache)
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{}")
    folder = convert_gguf(SMOLLM2_GGUF)
    assert (folder / "config.json").is_file() and len(cache.calls) == 1
    model, _ = load_base_model({"name_or_path": SMOLLM2_GGUF})
    assert model.config.num_hidden_layers == tiny_llama(vocab_size=8).config.num_hidden_layers
    assert convert_gguf(SMOLLM2_GGUF) == folder and len(cache.calls) == 1  # and only once


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_truncated_cached_file_names_the_folder_to_delete(damaged, tmp_path, monkeypatch, tokenizer):
    """The real converted SmolLM2 folder with one file truncated (the others linked, not copied)."""
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path))
    folder = tmp_path / "models" / REAL.name
    folder.mkdir(parents=True)
    for file in REAL.iterdir():
        if file.name == damaged:
            (folder / file.name).write_bytes(file.read_bytes()[: max(8, file.stat().st_size // 3)])
        else:
            (folder / file.name).symlink_to(file)
    with pytest.raises(UserError) as error:
        load_base_model({"name_or_path": SMOLLM2_GGUF})
    message = str(error.value)
    assert f"the converted model cache {folder} is corrupt" in message and f"rm -r {folder}" in message
    assert "\n" not in message
