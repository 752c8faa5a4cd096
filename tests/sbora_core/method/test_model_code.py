"""Finding a model already on this machine, and importing the code that loading it will run."""

from __future__ import annotations

import subprocess
import sys

from sbora_core.method.models import local_model_dir, resolve_model, set_model_cache_dir


def test_a_local_directory_is_found_and_a_missing_model_is_not_fetched(tiny_model_dir, tmp_path):
    set_model_cache_dir(tmp_path / "cache")
    try:
        assert local_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve() == resolve_model(str(tiny_model_dir))
        assert local_model_dir("smollm2-135m-instruct") is None  # known, not converted in this cache: not converted
        assert not (tmp_path / "cache").exists()
        assert local_model_dir(str(tmp_path)) is None  # a directory without config.json and weights
        assert local_model_dir("someone/some-model") is None  # would be a hub download
    finally:
        set_model_cache_dir(None)


def test_import_model_code_imports_the_modelling_module_a_first_load_would(tiny_model_dir, tmp_path):
    # transformers imports a model's modelling module lazily; a fresh interpreter shows whether it was.
    probe = (
        "import sys\n"
        "from sbora_core.method.models import import_model_code\n"
        "name = 'transformers.models.llama.modeling_llama'\n"
        "before = name in sys.modules\n"
        f"import_model_code([{str(tiny_model_dir)!r}, 'no-such-model', {str(tmp_path)!r}])\n"
        "print(before, name in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_asking_whether_a_layer_is_quantised_imports_no_bitsandbytes():
    # bitsandbytes' import costs ~2 s of CPU; a process that loads no quantised model must not pay it.
    probe = (
        "import sys, torch\n"
        "from sbora_core.method.linear import is_quantized_linear\n"
        "plain = is_quantized_linear(torch.nn.Linear(4, 4))\n"
        "imported = 'bitsandbytes' in sys.modules\n"
        "import bitsandbytes as bnb\n"
        "print(plain, imported, is_quantized_linear(bnb.nn.Linear4bit(64, 64)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["False", "False", "True"]
