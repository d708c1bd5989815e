"""Shared test setup: 8 fake CPU devices (for tensor parallelism), IEEE fp32 matmuls, rank
promotion as an error, and small random Hugging Face checkpoints written once per session."""

import os

from runenv import FAST_CPU_COMPILES

# Must happen before jax initialises its backends. The suite compiles far more than it
# computes, so XLA's CPU backend compiles the quick way (runenv.py; semantics unchanged).
for flag in ("--xla_force_host_platform_device_count=8", *FAST_CPU_COMPILES.split()):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (installed to compile for TPUs this machine does not have: test_tpu_compile.py) takes
# a machine-wide lock file when a process loads it; the suite's workers each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Implicit rank promotion is an error (subprocesses inherit it): jaxdec must run for users who
# set jax_numpy_rank_promotion="raise", and a broadcast that adds dimensions is written out.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (checkpoint directory, the transformers model), built lazily and cached."""
    from hf_models import write_checkpoint  # torch and transformers: only where tests use them

    cache = {}

    def get(name):
        if name not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{name}")
            cache[name] = (str(directory), write_checkpoint(name, directory))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def loaded(hf_checkpoints):
    """name -> jaxdec Model (fp32, one device), cached."""
    import jaxdec

    models = {}

    def get(name):
        if name not in models:
            models[name] = jaxdec.load_pretrained(hf_checkpoints(name)[0])
        return models[name]

    return get



@pytest.fixture(scope="session")
def tokenized(hf_checkpoints, tmp_path_factory):
    """name -> a copy of that checkpoint plus a tokenizer.json (for the CLI), cached."""
    import shutil

    from hf_models import make_tokenizer

    directories = {}

    def get(name):
        if name not in directories:
            directory = tmp_path_factory.mktemp("tokenized") / name
            shutil.copytree(hf_checkpoints(name)[0], directory)
            make_tokenizer().save(str(directory / "tokenizer.json"))
            directories[name] = str(directory)
        return directories[name]

    return get


@pytest.fixture(scope="session")
def tokenized_checkpoint(tokenized):
    """The llama-gqa checkpoint plus a tokenizer.json (for the CLI and README tests)."""
    return tokenized("llama-gqa")
