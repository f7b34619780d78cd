"""The persistent torch.compile cache: strop's directory unless the user chose another."""

from __future__ import annotations

import os

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from strop.train.compile_cache import enable_persistent_cache


def test_torch_default_is_replaced_by_strops_cache(tmp_path, monkeypatch):
    # Importing torch's compiler writes its temporary default into the environment.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("STROP_COMPILE_CACHE", str(tmp_path / "cache"))
    assert enable_persistent_cache() == tmp_path / "cache"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    assert (tmp_path / "cache").is_dir()


def test_a_users_own_inductor_cache_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("STROP_COMPILE_CACHE", str(tmp_path / "cache"))
    enable_persistent_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
