"""The worker's model cache: bounded by count, least recently used out, and an evicted model is freed
(no reference left anywhere once it is switched out)."""

from __future__ import annotations

import gc
import shutil
import weakref

import pytest

from latentforge.demo import bundled_model_path
from latentforge.server.config import ServerConfig
from latentforge.server.models import ModelCache, ModelCatalog, ModelNameError

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model")


@pytest.fixture
def catalog(tmp_path):
    for name in ("a", "b", "c"):
        shutil.copy(bundled_model_path(), tmp_path / f"{name}.safetensors")
    return ModelCatalog(None, tmp_path)


def test_switching_frees_the_old_model(catalog):
    cache = ModelCache(catalog, ServerConfig(max_models=2))
    a = weakref.ref(cache.get("a.safetensors"))
    b = weakref.ref(cache.get("b.safetensors"))
    assert cache.get("a.safetensors") is a()  # a used last: b is the least recently used
    cache.get("c.safetensors")
    gc.collect()
    assert list(cache.loaded) == ["a.safetensors", "c.safetensors"]
    assert b() is None and a() is not None


def test_byte_bound_keeps_only_what_fits(catalog):
    one = ModelCache(catalog, ServerConfig(max_models=1))
    pipe = one.get("a.safetensors")
    size = one.total_bytes()
    assert size == sum(p.numel() * p.element_size() for n in pipe.networks().values() for p in n.parameters())
    cache = ModelCache(catalog, ServerConfig(max_models=3, max_model_bytes=int(size * 1.5)))
    cache.get("a.safetensors")
    cache.get("b.safetensors")
    assert list(cache.loaded) == ["b.safetensors"]


def test_names_resolve_only_to_listed_models(catalog, tmp_path):
    assert catalog.names() == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert catalog.resolve("b") == "b.safetensors"
    assert catalog.resolve("c.safetensors [87c7fe64a1]") == "c.safetensors"
    for bad in ("../a", str(tmp_path / "a.safetensors"), "x/../../a", "", "nope"):
        with pytest.raises(ModelNameError):
            catalog.resolve(bad)
