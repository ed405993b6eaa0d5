"""The oneDNN / ideep per-shape cache bounds `import finetune` sets (finetune/cpu_caches.py)."""
import os
import subprocess
import sys

from finetune.cpu_caches import SHAPE_CACHE_BOUNDS, bound_shape_caches


def test_bounds_are_set_where_unset_and_a_users_value_is_kept():
    environ = {"LRU_CACHE_CAPACITY": "8"}
    onednn = SHAPE_CACHE_BOUNDS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert bound_shape_caches(environ) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": onednn, "LRU_CACHE_CAPACITY": "8"}
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": onednn, "LRU_CACHE_CAPACITY": "8"}


def test_importing_finetune_sets_them_before_any_model_runs():
    env = {k: v for k, v in os.environ.items() if k not in SHAPE_CACHE_BOUNDS}
    code = "import os, finetune; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [SHAPE_CACHE_BOUNDS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
                                  SHAPE_CACHE_BOUNDS["LRU_CACHE_CAPACITY"]]
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "2048"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2048", SHAPE_CACHE_BOUNDS["LRU_CACHE_CAPACITY"]]
