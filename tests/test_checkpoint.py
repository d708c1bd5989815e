"""Loading and exporting Hugging Face safetensors directories."""

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxdec
from jaxdec.checkpoint import CheckpointError
from jaxdec.models import llama
from hf_models import VARIANTS, make_tokenizer


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _params_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip_through_transformers(variant, loaded, tmp_path):
    model = loaded(variant)
    out = jaxdec.save_pretrained(model, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = np.random.RandomState(0).randint(0, 97, (2, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(jaxdec.forward(model, tokens))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    _params_equal(jaxdec.load_pretrained(out).params, model.params)


def test_sharded_index_and_dtype(loaded, tmp_path):
    model = loaded("llama-gqa")
    out = jaxdec.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=64 * 1024.0)
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    _params_equal(jaxdec.load_pretrained(out).params, model.params)
    bf16 = jaxdec.load_pretrained(out, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    # Exported in bf16, the checkpoint's declared dtype becomes the default.
    half = jaxdec.save_pretrained(bf16, tmp_path / "bf16")
    assert json.load(open(os.path.join(half, "config.json")))["torch_dtype"] == "bfloat16"
    assert jaxdec.load_pretrained(half).params["embed"].dtype == jnp.bfloat16


def test_loading_casts_as_numpy_does_and_takes_64_bit_tensors(hf_checkpoints, loaded, tmp_path):
    """The conversion runs on the devices: cast there, a tensor equals numpy's cast of it
    (round to nearest even); float64 tensors (cast on the host first) load as well."""
    from safetensors.numpy import save_file

    from jaxdec.checkpoint import read_safetensors_index

    name = "llama-bias"  # every kind of tensor: q|k|v, gate|up and their biases, o, down
    fp32 = loaded(name).params
    bf16 = jaxdec.load_pretrained(hf_checkpoints(name)[0], dtype=jnp.bfloat16).params
    for x, y in zip(jax.tree.leaves(fp32), jax.tree.leaves(bf16)):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x).astype(jnp.bfloat16))
    directory = _copy(hf_checkpoints(name)[0], tmp_path / "f64")
    path = os.path.join(directory, "model.safetensors")
    save_file({k: np.asarray(v.read(), np.float64) for k, v in read_safetensors_index(path).items()},
              path)
    assert {v.dtype for v in read_safetensors_index(path).values()} == {np.dtype(np.float64)}
    _params_equal(jaxdec.load_pretrained(directory, dtype=jnp.float32).params, fp32)
    # And back out, biases included, through a mesh whose qkv groups repeat KV heads.
    tp = jaxdec.load_pretrained(directory, dtype=jnp.float32, mesh=jaxdec.make_mesh(tp=8))
    out = jaxdec.save_pretrained(tp, tmp_path / "export")
    _params_equal(jaxdec.load_pretrained(out).params, fp32)
    # A KV head's copies made to differ (as a gradient step on this mesh does: each copy gets
    # its shard's share) are refused, not exported as the first copy.
    from jaxdec.models import llama

    layer = tp.params["layers"][0]
    name = "qkv" if "qkv" in layer else next(k for k in layer if k.startswith("qkv"))
    view = llama.qkv_view(layer[name], tp.config.num_heads, tp.config.head_dim)
    moved = view.at[..., 1, -2, :].add(1.0).reshape(layer[name].shape)
    params = dict(tp.params, layers=[dict(layer, **{name: moved}), *tp.params["layers"][1:]])
    with pytest.raises(ValueError, match=r"model.params\['layers'\]\[0\]\['qkv.*'\]: the copies "
                       r"of a KV head differ \(on this mesh of tp=8 > \d KV heads"):
        jaxdec.save_pretrained(dataclasses.replace(tp, params=params), tmp_path / "diverged")
    assert not os.path.exists(tmp_path / "diverged")


def test_export_brings_one_tensor_at_a_time_to_the_host(loaded, tmp_path, monkeypatch):
    """An export copies a tensor off the devices only when it writes it, and lets it go
    before the next: the host holds one tensor (it held a whole shard, 5 GiB by default),
    sharded or not; the files load as the model."""
    import weakref

    import safetensors

    from jaxdec import parallel

    alive, to_host = [], parallel.to_host

    def one_at_a_time(x):
        assert not [ref for ref in alive if ref() is not None], "an earlier tensor is held"
        host = to_host(x)
        alive.append(weakref.ref(host))
        return host

    monkeypatch.setattr(parallel, "to_host", one_at_a_time)
    model = loaded("llama-bias")
    for name, shard_bytes in (("sharded", 64 * 1024), ("single", 2**30)):
        alive.clear()
        out = jaxdec.save_pretrained(model, tmp_path / name, max_shard_bytes=shard_bytes)
        files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
        assert len(files) > 2 if name == "sharded" else files == ["model.safetensors"]
        stored = sum(len(safetensors.safe_open(os.path.join(out, f), "np").keys())
                     for f in files)
        assert len(alive) == stored  # each tensor copied once
        _params_equal(jaxdec.load_pretrained(out).params, model.params)


def test_layers_share_their_compiled_conversions(tmp_path):
    """Loading compiles one conversion per distinct tensor shape, not per layer: after a
    2-layer model, a 5-layer one of the same widths loads without compiling anything."""
    config = jaxdec.ModelConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    dirs = [jaxdec.save_pretrained(jaxdec.init_model(config.replace(num_layers=n),
                                                     jax.random.key(n)), tmp_path / str(n))
            for n in (2, 5)]
    jaxdec.load_pretrained(dirs[0])
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        model = jaxdec.load_pretrained(dirs[1])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and len(model.params["layers"]) == 5


def test_generation_config_travels_with_the_checkpoint(hf_checkpoints, tmp_path):
    """generation_config.json's settings (sampling defaults: transformers' generate samples
    with them) are written back by save_pretrained, with the config's ids; they were dropped
    (an export generated greedily in transformers), and overwriting the source lost them."""
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    settings = dict(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.3,
                    eos_token_id=2)
    json.dump(settings, open(os.path.join(directory, "generation_config.json"), "w"))
    model = jaxdec.load_pretrained(directory)
    assert model.generation_config == settings
    for out in (tmp_path / "export", directory):
        jaxdec.save_pretrained(model, out, overwrite=True)
        theirs = transformers.GenerationConfig.from_pretrained(out)
        assert (theirs.do_sample, theirs.temperature, theirs.top_p,
                theirs.repetition_penalty) == (True, 0.6, 0.9, 1.3)
        assert theirs.eos_token_id == model.config.eos_token_ids[0]
    # Ids it names stay its own (config.json's eos joined them: transformers' generate then
    # stopped at another token), missing ones come from the config.
    settings = dict(eos_token_id=5, pad_token_id=9)
    json.dump(settings, open(os.path.join(directory, "generation_config.json"), "w"))
    out = jaxdec.save_pretrained(jaxdec.load_pretrained(directory), tmp_path / "ids")
    theirs = transformers.GenerationConfig.from_pretrained(out)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (5, 9)


class _FailingOs:
    """The `os` module, but `replace` and `remove` raise once `budget` of them ran."""

    def __init__(self, budget):
        self.budget = budget

    def __getattr__(self, name):
        return getattr(os, name)

    def _spend(self, call, *args):
        if self.budget == 0:
            raise KeyboardInterrupt("stopped mid-save")
        self.budget -= 1
        return call(*args)

    def replace(self, *args):
        return self._spend(os.replace, *args)

    def remove(self, *args):
        return self._spend(os.remove, *args)


class _SyncCheckingOs:
    """The `os` module, recording which paths were fsync'ed; a rename of a file not synced
    (or into a directory whose entries are not synced at the end) fails the test."""

    def __init__(self):
        self.fds, self.synced = {}, []

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *args):
        fd = os.open(path, flags, *args)
        self.fds[fd] = os.path.abspath(path)
        return fd

    def fsync(self, fd):
        self.synced.append(self.fds[fd])
        return os.fsync(fd)

    def replace(self, src, dst):
        files = [os.path.join(src, f) for f in os.listdir(src)] if os.path.isdir(src) else [src]
        assert all(os.path.abspath(f) in self.synced for f in files), f"{src} not on the disk"
        return os.replace(src, dst)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_export_is_on_the_disk_before_it_is_renamed_into_place(loaded, tmp_path, monkeypatch,
                                                                  overwrite):
    import jaxdec.checkpoint as checkpoint

    target = tmp_path / "export"
    if overwrite:
        jaxdec.save_pretrained(loaded("llama-gqa"), target)
    recorder = _SyncCheckingOs()
    monkeypatch.setattr(checkpoint, "os", recorder)
    jaxdec.save_pretrained(loaded("llama-gqa"), target, overwrite=overwrite,
                           max_shard_bytes=16 * 1024)
    # The directory the renames changed, at the end.
    assert recorder.synced[-1] == str(target if overwrite else tmp_path)


def test_an_export_clears_what_killed_exports_left(loaded, tmp_path):
    """A process killed during an export left its staging folder (a whole copy of the
    weights) and, killed while moving shards, shards no index names: the next export into
    the directory removes them; not a running export's folder (its lock file held: by
    another container too, whose pids are not this one's), nor one without a lock file, nor
    the user's files."""
    import fcntl

    from jaxdec.checkpoint import _STAGING, _STAGING_LOCK

    old = loaded("llama-gqa")
    target = tmp_path / "export"
    jaxdec.save_pretrained(old, target, max_shard_bytes=16 * 1024)
    folders = {kind: target / f"{_STAGING}{kind}" for kind in ("dead", "live", "unlocked")}
    for kind, folder in folders.items():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"copy")
        if kind != "unlocked":
            (folder / _STAGING_LOCK).write_bytes(b"")
    held = os.open(folders["live"] / _STAGING_LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    (target / "model-00001-of-00009.k3x9_ab.safetensors").write_bytes(b"orphan")
    (target / "notes.txt").write_text("mine")
    new = dataclasses.replace(old, params=jax.tree.map(lambda x: x * 0.5, old.params))
    try:
        jaxdec.save_pretrained(new, target, overwrite=True, max_shard_bytes=16 * 1024)
    finally:
        os.close(held)
    names = set(os.listdir(target))
    assert folders["dead"].name not in names
    assert "model-00001-of-00009.k3x9_ab.safetensors" not in names
    assert {folders["live"].name, folders["unlocked"].name, "notes.txt"} <= names
    assert not any(n.startswith((_STAGING, ".jaxdec-new-")) for n in names
                   - {folders["live"].name, folders["unlocked"].name})  # its own went
    _params_equal(jaxdec.load_pretrained(target).params, new.params)


@pytest.mark.parametrize("old_shards, new_shards", [(True, True), (False, True), (True, False)],
                         ids=["shards-over-shards", "shards-over-one", "one-over-shards"])
def test_an_overwrite_stopped_anywhere_loads_the_old_or_the_new_model(
        loaded, tmp_path, monkeypatch, old_shards, new_shards):
    """Killed mid-move, an export over an older one left a mix of both models' shards (or no
    weights): every stopping point now leaves one of the two."""
    import jaxdec.checkpoint as checkpoint

    old = loaded("llama-gqa")
    new = dataclasses.replace(old, params=jax.tree.map(lambda x: x * 0.5, old.params))
    small = 16 * 1024  # several shards
    first = tmp_path / "first"
    jaxdec.save_pretrained(old, first, max_shard_bytes=small if old_shards else 2**40)
    for budget in range(200):
        target = tmp_path / f"stopped{budget}"
        shutil.copytree(first, target)
        monkeypatch.setattr(checkpoint, "os", _FailingOs(budget))
        try:
            jaxdec.save_pretrained(new, target, overwrite=True,
                                   max_shard_bytes=small if new_shards else 2**40)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(checkpoint, "os", os)
        params = jaxdec.load_pretrained(target).params
        same = [jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params,
                                          m.params)) for m in (old, new)]
        assert any(same), f"stopped after {budget} moves: a mix of both models"
        shutil.rmtree(target)
        if finished:
            assert same[1]
            break
    assert finished


def test_ctrl_c_during_an_overwrites_moves_waits_for_them(loaded, tmp_path, monkeypatch):
    """Ctrl-C between the weights' rename and config.json's left the new weights beside the
    old config.json, which loaded silently as a model never trained (the staging folder,
    the new config.json in it, removed): the moves finish, then KeyboardInterrupt."""
    import signal

    import jaxdec.checkpoint as checkpoint

    old = loaded("llama-gqa")
    new = dataclasses.replace(old, params=jax.tree.map(lambda x: x * 0.5, old.params),
                              config=dataclasses.replace(old.config, rms_norm_eps=1e-3))
    target = tmp_path / "export"
    jaxdec.save_pretrained(old, target)

    class InterruptingOs:
        interrupted = False

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, *args):  # Ctrl-C as the first file (the weights) moves
            if not self.interrupted:
                self.interrupted = True
                os.kill(os.getpid(), signal.SIGINT)
            return os.replace(*args)

    monkeypatch.setattr(checkpoint, "os", InterruptingOs())
    with pytest.raises(KeyboardInterrupt):
        jaxdec.save_pretrained(new, target, overwrite=True)
    monkeypatch.setattr(checkpoint, "os", os)
    reloaded = jaxdec.load_pretrained(target)
    assert reloaded.config.rms_norm_eps == 1e-3
    _params_equal(reloaded.params, new.params)
    assert not [n for n in os.listdir(target) if n.startswith(checkpoint._STAGING)]


def test_an_export_is_locked_while_it_is_flushed(loaded, tmp_path, monkeypatch):
    """The lock was released before the staging folder's flush (minutes for a large model):
    an export killed then left a folder no later export removed (a whole copy of the
    weights, and a directory "not empty" for the same call)."""
    import jaxdec.checkpoint as checkpoint

    flush, locked = checkpoint._flush_to_disk, []

    def checking(directory, **kwargs):
        if os.path.basename(directory).startswith(checkpoint._STAGING):
            locked.append(os.path.exists(os.path.join(directory, checkpoint._STAGING_LOCK)))
        return flush(directory, **kwargs)

    monkeypatch.setattr(checkpoint, "_flush_to_disk", checking)
    jaxdec.save_pretrained(loaded("llama-gqa"), tmp_path / "out")
    assert locked == [True]
    assert not os.path.exists(tmp_path / "out" / checkpoint._STAGING_LOCK)


def test_an_export_where_locks_are_not_supported(loaded, tmp_path, monkeypatch):
    """A filesystem without flock (some NFS and FUSE mounts): the lock file made before the
    lock failed went into the exported directory."""
    import fcntl

    def unsupported(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    for overwrite in (False, True):
        out = jaxdec.save_pretrained(loaded("llama-gqa"), tmp_path / "out", overwrite=overwrite)
        assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_killed_export_into_an_empty_directory_does_not_block_the_next(loaded, tmp_path):
    """The staging folder a killed export left in an empty directory made the same call
    again fail ("exists and is not empty"); it is removed first. `~` is the user's home as
    for load_pretrained (a literal `./~` folder was made)."""
    from jaxdec.checkpoint import _STAGING, _STAGING_LOCK

    home = tmp_path / "home"
    target = home / "export"
    dead = target / f"{_STAGING}dead"
    dead.mkdir(parents=True)
    (dead / _STAGING_LOCK).write_bytes(b"")
    (dead / "model.safetensors").write_bytes(b"copy")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        patch.chdir(tmp_path)
        assert jaxdec.save_pretrained(loaded("llama-gqa"), "~/export") == str(target)
        assert not (tmp_path / "~").exists()
        _params_equal(jaxdec.load_pretrained("~/export").params, loaded("llama-gqa").params)
    assert _STAGING + "dead" not in os.listdir(target)


def test_a_config_no_checkpoint_can_express_fails_before_the_weights(loaded, tmp_path,
                                                                     monkeypatch):
    """A config its model type cannot write (here two window sizes): refused before any
    weight is converted (after all of them, minutes on a large model)."""
    import jaxdec.checkpoint as checkpoint

    model = loaded("llama-gqa")
    config = dataclasses.replace(model.config, model_type="mistral",
                                 layer_windows=(8, 4) + (None,) * (model.config.num_layers - 2))
    monkeypatch.setattr(checkpoint, "_write_weights", lambda *a: pytest.fail("wrote weights"))
    with pytest.raises(ValueError, match=r"cannot express several window sizes \[4, 8\]"):
        checkpoint.save_pretrained(dataclasses.replace(model, config=config), tmp_path / "q")


def test_tokenizer_travels_with_the_checkpoint(hf_checkpoints, tmp_path):
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    make_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    model = jaxdec.load_pretrained(directory)
    assert model.tokenizer.decode(model.tokenizer.encode("hello the fox").ids) == "hello the fox"
    out = jaxdec.save_pretrained(model, tmp_path / "export")
    assert jaxdec.load_pretrained(out).tokenizer.get_vocab() == model.tokenizer.get_vocab()
    # transformers' tokenizer settings travel too (a new directory got the special tokens
    # alone: transformers' tokenizer of the export padded on the right, not the left); a
    # template the model was given without is not written back.
    settings = dict(padding_side="left", model_max_length=77, eos_token="</s>",
                    chat_template="{{ messages[0]['content'] }}")
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(settings))
    model = dataclasses.replace(jaxdec.load_pretrained(directory), chat_template=None)
    assert model.tokenizer_config == settings
    out = jaxdec.save_pretrained(model, tmp_path / "again")
    written = json.loads((Path(out) / "tokenizer_config.json").read_text())
    assert written == {k: v for k, v in settings.items() if k != "chat_template"}
    with_template = jaxdec.load_pretrained(directory)
    written = json.loads(Path(jaxdec.save_pretrained(with_template, tmp_path / "third"),
                              "tokenizer_config.json").read_text())
    assert written == settings
    # A tokenizer of custom code: its .py files are not exported, so neither is the code's
    # name (transformers failed to load the export); transformers' generic class reads
    # tokenizer.json (without a class, transformers 4 picked LlamaTokenizerFast, which adds
    # a bos of its own).
    custom = dict(settings, auto_map={"AutoTokenizer": [None, "tokenization_my.MyTokenizer"]},
                  tokenizer_class="MyTokenizer")
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(custom))
    written = json.loads(Path(jaxdec.save_pretrained(jaxdec.load_pretrained(directory),
                                                     tmp_path / "fourth"),
                              "tokenizer_config.json").read_text())
    assert written == dict(settings, tokenizer_class="PreTrainedTokenizerFast")


def test_params_are_placed_with_the_mesh_sharding(hf_checkpoints, loaded, tmp_path):
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(tp=2))
    qkv = model.params["layers"][0]["qkv"]  # 2 groups (KV heads) of 4 query heads + k + v
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "tp")  # flat: whole groups
    assert qkv.addressable_shards[0].data.shape == (64, 1 * 6 * 8)
    # 97 rows do not split two ways: the vocabulary is padded with zero rows.
    assert model.params["embed"].shape == (98, 64)
    np.testing.assert_array_equal(np.asarray(model.params["embed"][97]), 0)
    # The padding never reaches an exported checkpoint.
    out = jaxdec.save_pretrained(model, tmp_path / "export")
    _params_equal(jaxdec.load_pretrained(out).params, loaded("llama-gqa").params)


def test_export_from_more_shards_than_kv_heads(hf_checkpoints, loaded, tmp_path):
    """At tp = 4 > K = 2 each KV head's projection sits in two qkv groups; the export writes
    each once, and the checkpoint reloads as it was."""
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(tp=4))
    assert llama.qkv_view(model.params["layers"][0]["qkv"], 8, 8).shape[1] == 4
    out = jaxdec.save_pretrained(model, tmp_path / "export")
    _params_equal(jaxdec.load_pretrained(out).params, loaded("llama-gqa").params)


def test_a_new_export_directory_has_the_mode_a_new_directory_gets(loaded, tmp_path):
    """The directory is built under a temporary name (mkdtemp: mode 0700) and renamed into
    place; others may read it as they may any directory this process makes."""
    (tmp_path / "plain").mkdir()
    out = jaxdec.save_pretrained(loaded("llama-gqa"), tmp_path / "export")
    assert os.stat(out).st_mode == os.stat(tmp_path / "plain").st_mode


def test_a_directory_another_save_made_meanwhile_is_named(loaded, tmp_path, monkeypatch):
    """Two saves to one new path at once: the later rename failed with a bare OSError
    ("Directory not empty"); the first one's directory is left whole."""
    import jaxdec.checkpoint as checkpoint

    target = tmp_path / "same"
    write = checkpoint._write_weights

    def racing(*args):
        write(*args)
        target.mkdir()
        (target / "config.json").write_text("{}")  # the other save's, finished first

    monkeypatch.setattr(checkpoint, "_write_weights", racing)
    with pytest.raises(FileExistsError, match="appeared while this export was writing"):
        jaxdec.save_pretrained(loaded("llama-gqa"), target)
    assert os.listdir(target) == ["config.json"]
    assert [n for n in os.listdir(tmp_path) if n != "same"] == []


def test_save_refuses_a_non_empty_directory_and_leaves_no_temporaries(loaded, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        jaxdec.save_pretrained(loaded("llama-gqa"), target)
    for args, kwargs, error, match in [
            ((None, target), {}, TypeError, "model must be a jaxdec Model, got NoneType"),
            ((loaded("llama-gqa"), 5), {}, TypeError, "path must be a directory path"),
            ((loaded("llama-gqa"), target), dict(overwrite="yes"), TypeError,
             "overwrite must be a bool"),
            ((loaded("llama-gqa"), target), dict(overwrite=True, dtype="int8"), ValueError,
             "dtype=int8 is not floating point"),
            # (written with torch_dtype float8_e4m3fn: neither transformers nor jaxdec loaded
            # it; float8_e4m3fnuz raised a bare KeyError)
            ((loaded("llama-gqa"), target), dict(overwrite=True, dtype="float8_e4m3fn"),
             ValueError, "dtype=float8_e4m3fn is no dtype jaxdec holds parameters"),
            ((loaded("llama-gqa"), target), dict(overwrite=True, dtype="float8_e4m3fnuz"),
             ValueError, "dtype=float8_e4m3fnuz is no dtype"),
            ((loaded("llama-gqa"), target), dict(overwrite=True, max_shard_bytes="5GB"),
             TypeError, "max_shard_bytes must be a number of bytes"),
            ((loaded("llama-gqa"), target), dict(overwrite=True, max_shard_bytes=float("nan")),
             ValueError, "max_shard_bytes must be an int >= 1, got nan"),
            ((loaded("llama-gqa"), target), dict(overwrite=True, max_shard_bytes=0),
             ValueError, "max_shard_bytes must be an int >= 1, got 0")]:
        with pytest.raises(error, match=match):
            jaxdec.save_pretrained(*args, **kwargs)
    # An edited leaf of the right size but the wrong shape (a transposed weight) would be
    # reshaped into scrambled weights; an integer leaf would be a checkpoint nobody loads.
    model = loaded("llama-gqa")
    down = model.params["layers"][0]["down"]
    for leaf, error, match in [
            (down.T, ValueError, r"params\['layers'\]\[0\]\['down'\] has shape \(\d+, \d+\); "
                                 r"model.config on a tp=1 mesh needs"),
            (down.astype(jnp.int32), TypeError, r"\['down'\] must be a floating-point array")]:
        params = jax.tree.map(lambda x: x, model.params)
        params["layers"][0]["down"] = leaf
        with pytest.raises(error, match=match):
            jaxdec.save_pretrained(dataclasses.replace(model, params=params), target,
                                   overwrite=True)
    assert sorted(os.listdir(target)) == ["precious.txt"]
    # Overwriting keeps unrelated files and replaces stale weight shards.
    jaxdec.save_pretrained(loaded("llama-gqa"), target, overwrite=True, max_shard_bytes=64 * 1024)
    assert "model.safetensors.index.json" in os.listdir(target)
    jaxdec.save_pretrained(loaded("llama-gqa"), target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json",
                                          "model.safetensors", "precious.txt"]
    _params_equal(jaxdec.load_pretrained(target).params, loaded("llama-gqa").params)
    # Only transformers' weight file names are replaced: the user's model_ema.safetensors
    # was deleted as stale.
    shutil.copy(os.path.join(target, "model.safetensors"),
                os.path.join(target, "model_ema.safetensors"))
    jaxdec.save_pretrained(loaded("llama-gqa"), target, overwrite=True)
    assert "model_ema.safetensors" in os.listdir(target)
    os.remove(os.path.join(target, "model_ema.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _hub_cache(root, checkpoint, repo="models--org--tiny", commit="0123abcd", ref=True):
    """A Hugging Face cache holding `checkpoint` as huggingface_hub lays one out: files in
    blobs/, the snapshot's entries symlinks to them, refs/main naming the snapshot."""
    repo_dir = root / repo
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(checkpoint))):
        blob = repo_dir / "blobs" / f"blob{i}"
        shutil.copy(os.path.join(checkpoint, name), blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    if ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir


def test_load_a_model_from_the_hugging_face_cache(hf_checkpoints, loaded, tmp_path,
                                                  monkeypatch):
    """By model id (HF_HUB_CACHE, else HF_HOME/hub), or the cached model's folder: its
    refs/main snapshot, whose files are symlinks into blobs/."""
    from jaxdec.checkpoint import checkpoint_dir, hub_cache_dir

    repo = _hub_cache(tmp_path / "hub", hf_checkpoints("llama-gqa")[0])
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub_cache_dir() == str(tmp_path / "hub")
    snapshot = str(repo / "snapshots" / "0123abcd")
    assert checkpoint_dir("org/tiny") == checkpoint_dir(repo) == snapshot
    assert checkpoint_dir(snapshot) == snapshot
    _params_equal(jaxdec.load_pretrained("org/tiny").params, loaded("llama-gqa").params)
    # huggingface_hub's older variable, and variables in the paths, as it reads them.
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == str(tmp_path / "legacy")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE")
    monkeypatch.setenv("JAXDEC_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$JAXDEC_TEST_ROOT")
    assert hub_cache_dir() == str(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"nor is 'org/tiny' a model in the Hugging "
                       r"Face cache \(.*elsewhere\); jaxdec downloads nothing"):
        jaxdec.load_pretrained("org/tiny")


def test_hugging_face_cache_folders_without_a_clear_snapshot(hf_checkpoints, tmp_path):
    from jaxdec.checkpoint import checkpoint_dir

    source = hf_checkpoints("llama-gqa")[0]
    one = _hub_cache(tmp_path, source, repo="models--a--one", ref=False)
    assert checkpoint_dir(one) == str(one / "snapshots" / "0123abcd")  # the only snapshot
    (one / "snapshots" / "4567").mkdir()
    with pytest.raises(FileNotFoundError, match="no refs/main and 2 snapshots"):
        checkpoint_dir(one)
    broken = _hub_cache(tmp_path, source, repo="models--a--broken")
    (broken / "refs" / "main").write_text("feedbeef")
    with pytest.raises(FileNotFoundError, match="names snapshot 'feedbeef'"):
        jaxdec.load_pretrained(broken)


# ----------------------------------------------------------------------------- bad input


def test_missing_directory_and_files(hf_checkpoints, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxdec.load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"does not exist$"):  # a path, not a hub id
        jaxdec.load_pretrained("./acme/tiny")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~": the user's home, as in a shell
    shutil.copytree(hf_checkpoints("llama-gqa")[0], tmp_path / "home" / "mine")
    assert jaxdec.load_pretrained("~/mine").config == jaxdec.load_pretrained(
        hf_checkpoints("llama-gqa")[0]).config
    with pytest.raises(NotADirectoryError, match="config.json is a file: a checkpoint is the "
                                                 "directory"):
        jaxdec.load_pretrained(os.path.join(hf_checkpoints("llama-gqa")[0], "config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        jaxdec.load_pretrained(empty)
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        jaxdec.load_pretrained(directory)
    # A Hugging Face cache's link to a blob that is gone (it said "no model.safetensors ...;
    # found [..., 'model.safetensors']").
    os.symlink("../../blobs/0123abcd", os.path.join(directory, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is a broken link \(to "
                                                r"../../blobs/0123abcd\): an interrupted"):
        jaxdec.load_pretrained(directory)
    # A broken link to an index beside a single file is not read (the single file wins).
    os.remove(os.path.join(directory, "model.safetensors"))
    shutil.copy(os.path.join(hf_checkpoints("llama-gqa")[0], "model.safetensors"), directory)
    os.symlink("../../blobs/4567", os.path.join(directory, "model.safetensors.index.json"))
    assert jaxdec.load_pretrained(directory).config.num_layers == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "short"])
def test_corrupt_safetensors(hf_checkpoints, tmp_path, damage):
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    path = os.path.join(directory, "model.safetensors")
    data = open(path, "rb").read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage-header":
        data = data[:8] + b"\xff" * 64 + data[72:]
    else:
        data = data[:5]
    open(path, "wb").write(data)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        jaxdec.load_pretrained(directory)


def _with_header(path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


A = '"a": {"dtype": "F32", "shape": %s, "data_offsets": %s}'
B = '"b": {"dtype": "F32", "shape": [2], "data_offsets": %s}'


@pytest.mark.parametrize("header,data,message", [
    # Overlapping, gapped or trailing bytes, a name twice: the safetensors library refuses
    # them all; jaxdec read the overlap as a tensor of its own (wrong weights, silently).
    ("{%s, %s}" % (A % ("[2]", "[0, 8]"), B % "[4, 12]"), 16, "overlap or gap"),
    ("{%s, %s}" % (A % ("[2]", "[0, 8]"), B % "[12, 20]"), 20, "overlap or gap"),
    ("{%s}" % A % ("[2]", "[0, 8]"), 12, "its tensors cover 8 of its 12 data bytes"),
    ("{%s, %s}" % (A % ("[2]", "[0, 8]"), A % ("[2]", "[8, 16]")), 16, "'a' given twice"),
    # Shapes and offsets are JSON integers >= 0 (2.9 was read as 2, "2" and true as 2, 1).
    ("{%s}" % A % ("[2.9]", "[0, 8]"), 8, "bad entry for tensor 'a'"),
    ("{%s}" % A % ('["2"]', "[0, 8]"), 8, "bad entry for tensor 'a'"),
    ("{%s}" % A % ("[true, 2]", "[0, 8]"), 8, "bad entry for tensor 'a'"),
    ("{%s}" % A % ("[-2, -1]", "[0, 8]"), 8, "bad entry for tensor 'a'"),
    # (These escaped as OverflowError, ValueError and RecursionError, naming no file.)
    ("{%s}" % A % ("[2]", "[0, Infinity]"), 8, "bad entry for tensor 'a'"),
    ("{%s}" % A % ("[2]", "[0, %s]" % ("9" * 5000)), 8, "header is not JSON"),
    ("[" * 100_000 + "]" * 100_000, 0, "header is not JSON"),
])
def test_a_damaged_header_is_refused(tmp_path, header, data, message):
    from safetensors.numpy import load_file

    from jaxdec.checkpoint import read_safetensors_index

    path = str(tmp_path / "model.safetensors")
    _with_header(path, header, b"\0" * data)
    with pytest.raises(CheckpointError, match=f"corrupt safetensors file {re.escape(path)}: "
                                              f".*{message}"):
        read_safetensors_index(path)
    with pytest.raises(Exception):  # noqa: B017 (the library refuses it too)
        load_file(path)
    _with_header(path, "{%s, %s}" % (A % ("[2]", "[0, 8]"), B % "[8, 16]"), b"\0" * 16)
    assert set(read_safetensors_index(path)) == {"a", "b"} == set(load_file(path))


def test_wrong_shape_names_tensor_and_both_shapes(hf_checkpoints, tmp_path):
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    config = json.load(open(os.path.join(directory, "config.json")))
    config["intermediate_size"] = 96
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight.*\(128, 64\).*\(96, 64\)"):
        jaxdec.load_pretrained(directory)


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    from safetensors.numpy import save_file

    from jaxdec.checkpoint import read_safetensors_index

    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    path = os.path.join(directory, "model.safetensors")
    tensors = {k: np.array(v.read()) for k, v in read_safetensors_index(path).items()
               if k != "model.norm.weight"}
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        jaxdec.load_pretrained(directory)


def test_a_tied_checkpoints_stored_head_must_be_the_embedding(hf_checkpoints, tmp_path):
    """A tied checkpoint may store the shared matrix twice (loaded as one); a stored head
    that differs is two models: refused (transformers uses the stored head; jaxdec tied the
    embedding, silently: other logits)."""
    from safetensors.numpy import save_file

    from jaxdec.checkpoint import read_safetensors_index

    source = hf_checkpoints("qwen2-mqa-tied")[0]
    want = np.asarray(jaxdec.forward(jaxdec.load_pretrained(source), [[1, 2, 3]]))
    directory = _copy(source, tmp_path / "ckpt")
    path = os.path.join(directory, "model.safetensors")
    tensors = {k: np.array(v.read()) for k, v in read_safetensors_index(path).items()}
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, path)
    np.testing.assert_array_equal(
        np.asarray(jaxdec.forward(jaxdec.load_pretrained(directory), [[1, 2, 3]])), want)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] * 2}, path)
    with pytest.raises(CheckpointError, match="ties the embeddings .* stores an lm_head.weight "
                                              "that differs"):
        jaxdec.load_pretrained(directory)
    # The shared matrix stored as the head alone is the embedding too (as transformers
    # reads it; "model.embed_tokens.weight is missing" before), without a warning.
    head_only = {k: v for k, v in tensors.items() if k != "model.embed_tokens.weight"}
    save_file({**head_only, "lm_head.weight": tensors["model.embed_tokens.weight"]}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = jaxdec.load_pretrained(directory)
    np.testing.assert_array_equal(np.asarray(jaxdec.forward(model, [[1, 2, 3]])), want)


def test_a_tensor_the_index_leaves_out_is_read_from_its_shard(loaded, tmp_path):
    """transformers reads every tensor of the shards an index lists: one the weight_map
    omits loads too (jaxdec called it missing from the directory)."""
    model = loaded("llama-gqa")
    out = jaxdec.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index_path = os.path.join(out, "model.safetensors.index.json")
    index = json.load(open(index_path))
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    json.dump(index, open(index_path, "w"))
    _params_equal(jaxdec.load_pretrained(out).params, model.params)


def test_a_single_file_wins_over_an_index_beside_it(hf_checkpoints, loaded, tmp_path):
    """model.safetensors beside a model.safetensors.index.json (a copy's leftovers): the
    single file is read, as transformers reads it (the index was, silently)."""
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    other = tmp_path / "sharded"
    jaxdec.save_pretrained(jaxdec.init_model(loaded("llama-gqa").config, jax.random.key(9)),
                           other, max_shard_bytes=50_000)
    assert "model.safetensors.index.json" in os.listdir(other)
    for name in os.listdir(other):
        if name.startswith("model-") or name == "model.safetensors.index.json":
            shutil.copy(other / name, os.path.join(directory, name))
    np.testing.assert_array_equal(
        np.asarray(jaxdec.forward(jaxdec.load_pretrained(directory), [[1, 2, 3]])),
        np.asarray(jaxdec.forward(loaded("llama-gqa"), [[1, 2, 3]])))


def test_unsupported_architecture(hf_checkpoints, tmp_path):
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    config = json.load(open(os.path.join(directory, "config.json")))
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(ValueError, match="supported: llama"):
        jaxdec.load_pretrained(directory)


def test_bad_dtype_argument(hf_checkpoints):
    with pytest.raises(TypeError, match="dtype"):
        jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], dtype="not-a-dtype")
    with pytest.raises(ValueError, match="dtype=int8 is not floating point"):
        jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], dtype="int8")
    # Without jax's 64-bit mode float64 arrays would quietly be float32.
    with pytest.raises(ValueError, match="dtype=float64 needs jax's 64-bit mode"):
        jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], dtype="float64")


def test_quantized_checkpoints_are_refused(hf_checkpoints, tmp_path):
    """A quantized checkpoint gets an error, never weights cast without their scales."""
    from safetensors.torch import save_file

    from jaxdec.checkpoint import read_safetensors_index

    source = hf_checkpoints("llama-gqa")[0]
    declared = _copy(source, tmp_path / "declared")  # as GPTQ, AWQ, bitsandbytes, FP8 export
    config = json.load(open(os.path.join(declared, "config.json")))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    json.dump(config, open(os.path.join(declared, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="quantized checkpoint.*quant_method='gptq'"):
        jaxdec.load_pretrained(declared)

    # FP8 weights with a scale beside them, no quantization_config: the dtype says it.
    fp8 = _copy(source, tmp_path / "fp8")
    path = os.path.join(fp8, "model.safetensors")
    tensors = {k: torch.from_numpy(np.array(v.read()).astype(np.float32))
               for k, v in read_safetensors_index(path).items()}
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    tensors[name.replace("weight", "weight_scale")] = torch.ones(())
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"'{name}' in .* is float8_e4m3fn"):
        jaxdec.load_pretrained(fp8)


def _append_raw_tensor(path, name, dtype_name, shape, nbytes):
    """Rewrites a safetensors file with one more tensor of a dtype numpy may lack."""
    import struct

    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    header[name] = {"dtype": dtype_name, "shape": list(shape),
                    "data_offsets": [len(body), len(body) + nbytes]}
    raw = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + body + b"\x01" * nbytes)


def test_tensors_of_other_dtypes_the_format_names(hf_checkpoints, loaded, tmp_path):
    """An unused tensor of a dtype the format names (U16, U32, F8_E8M0 scales, packed F4) is
    ignored with the other unexpected tensors (such a file was "corrupt"); a parameter of one
    is refused, naming it."""
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    path = os.path.join(directory, "model.safetensors")
    for name, dtype, shape, nbytes in [("extra.u16", "U16", (3,), 6), ("extra.u32", "U32", (2,), 8),
                                       ("extra.scales", "F8_E8M0", (4,), 4),
                                       ("extra.packed", "F4", (3,), 2)]:
        _append_raw_tensor(path, name, dtype, shape, nbytes)
    with pytest.warns(UserWarning, match="ignoring 4 unexpected tensors"):
        model = jaxdec.load_pretrained(directory)
    np.testing.assert_array_equal(np.asarray(jaxdec.forward(model, [[1, 2, 3]])),
                                  np.asarray(jaxdec.forward(loaded("llama-gqa"), [[1, 2, 3]])))

    from jaxdec.checkpoint import read_safetensors_index
    # The offsets of a packed dtype are checked still (3 F4 values are 2 bytes, not 1).
    bad = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "bad")
    _append_raw_tensor(os.path.join(bad, "model.safetensors"), "extra.packed", "F4", (3,), 1)
    with pytest.raises(CheckpointError, match="'extra.packed'.*of the wrong size"):
        read_safetensors_index(os.path.join(bad, "model.safetensors"))

    quantized = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "quantized")
    path = os.path.join(quantized, "model.safetensors")
    tensors = {k: np.array(v.read()) for k, v in read_safetensors_index(path).items()}
    name = "model.layers.0.self_attn.o_proj.weight"
    from safetensors.numpy import save_file
    save_file({k: v.view(np.uint32) if k == name else v for k, v in tensors.items()}, path)
    with pytest.raises(CheckpointError, match=f"'{name}' in .* is uint32"):
        jaxdec.load_pretrained(quantized)
    save_file({k: v for k, v in tensors.items() if k != name}, path)
    _append_raw_tensor(path, name, "F4", tensors[name].shape, tensors[name].size // 2)
    with pytest.raises(CheckpointError, match=f"'{name}' in .* is F4"):
        jaxdec.load_pretrained(quantized)


@pytest.mark.parametrize("weight_map", [
    ["model-00001-of-00002.safetensors"], {"model.norm.weight": 3},
    {"model.norm.weight": "../elsewhere/model.safetensors"}, {"model.norm.weight": ""}])
def test_a_malformed_index_is_named(hf_checkpoints, tmp_path, weight_map):
    """An index whose weight_map is no map of names to shard files in the directory: a
    CheckpointError naming the index (a list failed in .values(); a path outside the
    directory was read)."""
    directory = _copy(hf_checkpoints("llama-gqa")[0], tmp_path / "ckpt")
    os.remove(os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with pytest.raises(CheckpointError, match="corrupt index .*index.json: its weight_map must "
                                              "map tensor names to the names of shard files"):
        jaxdec.load_pretrained(directory)
