"""lab checkpoints: exact round trips, tied weights stored once, Config subclasses,
clear errors for mismatches, atomic saves, and no unpickling."""

from __future__ import annotations

import ast
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lab.checkpoint
from lab import GPT, Config
from lab.checkpoint import CheckpointError, load_pretrained, load_state, load_weights, read_tensors

TINY = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=61, block_size=32)


@dataclass
class MyConfig(Config):
    """The guide's subclass with an extra field."""

    custom_param: float = 0.1


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(Config(**{**TINY, **overrides})).eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_is_exact_and_ties_are_stored_once(tmp_path):
    model = tiny_model(tie_embeddings=True, layer_overrides={1: {"sliding_window_size": 4}})
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names

    loaded = GPT.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert_same_state(model, loaded)
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert Config.load(tmp_path / "ckpt" / "config.json") == model.config


def test_config_subclass_is_rebuilt(tmp_path):
    torch.manual_seed(0)
    model = GPT(MyConfig(**TINY, custom_param=0.5))
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert type(loaded.config) is MyConfig and loaded.config.custom_param == 0.5
    with pytest.raises(CheckpointError, match="config_class=YourConfig"):
        load_pretrained(tmp_path, GPT, config_class=Config)  # Config has no custom_param


def test_dtype_follows_the_checkpoint_unless_asked(tmp_path):
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    # recomputed buffers keep full precision (bf16 RoPE frequencies drift with position)
    assert loaded.transformer.h[0].attn.positional.inv_freq.values.dtype == torch.float32
    loaded = GPT.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight.dtype == torch.float32


def test_mismatched_config_lists_missing_unexpected_and_shapes(tmp_path):
    tiny_model(bias=True, intermediate_size=64).save_pretrained(tmp_path)
    other = GPT(Config(**{**TINY, "n_layer": 3, "intermediate_size": 48}))
    tensors, _ = read_tensors(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_state(other, tensors)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "missing (6): transformer.h.2.attn.attn.weight" in message
    assert "unexpected (" in message and "transformer.h.0.attn.proj.bias" in message
    assert "transformer.h.0.mlp.fc_1.weight: checkpoint (128, 32) vs model (96, 32)" in message

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 48}))
    with pytest.raises(
        CheckpointError,
        match=r"transformer\.wte\.weight: checkpoint \(61, 32\) vs model \(61, 48\)",
    ):
        GPT.from_pretrained(tmp_path)


def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_model()
    old.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(lab.checkpoint, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        tiny_model(n_embd=64).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert_same_state(GPT.from_pretrained(tmp_path / "ckpt"), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left


def test_failed_swap_restores_the_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_model()
    old.save_pretrained(tmp_path / "ckpt")
    real_rename = lab.checkpoint.os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(lab.checkpoint.os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        tiny_model(n_embd=64).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert_same_state(GPT.from_pretrained(tmp_path / "ckpt"), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_resave_replaces_weights_and_keeps_other_files(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kept": true}')
    new = tiny_model(n_embd=64)
    new.save_pretrained(tmp_path)
    assert_same_state(GPT.from_pretrained(tmp_path), new)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"kept": True}


class _Payload:
    """Unpickling this would call ``_payload_ran``: a stand-in for arbitrary code."""

    ran = False

    def __reduce__(self):
        return (_payload_ran, ())


def _payload_ran():
    _Payload.ran = True
    return {}


def test_pickled_weights_are_never_unpickled(tmp_path):
    model = tiny_model()
    Config.save(model.config, tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert_same_state(GPT.from_pretrained(tmp_path), model)  # plain tensors load

    torch.save({"weights": _Payload()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt or holds objects") as error:
        GPT.from_pretrained(tmp_path)
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)
    assert not _Payload.ran


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.config"):
        lab.checkpoint.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(CheckpointError, match="format"):
        tiny_model().save_pretrained(tmp_path / "x", format="onnx")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(Config(**TINY).to_dict()))
    with pytest.raises(CheckpointError, match="has no weights"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_weights(tiny_model(), tmp_path / "nowhere")


def test_tied_weights_load_into_a_fresh_model(tmp_path):
    """``load_weights`` fills both names of a tied tensor stored once (fit's old reader
    raised a raw RuntimeError for the missing ``lm_head.weight``)."""
    model = tiny_model(tie_embeddings=True)
    model.save_pretrained(tmp_path)
    fresh = GPT(Config(**TINY, tie_embeddings=True))
    assert load_weights(fresh, tmp_path) is fresh
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert_same_state(fresh, model)


def _break(tmp_path, name: str, data: bytes) -> None:
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / name).write_bytes(data)


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("model.safetensors", b"\x13\x00\x00", "truncated"),
        ("model.safetensors", bytes(range(256)) * 64, "random bytes"),
        ("model.safetensors", b"", "empty"),
        ("model.pt", b"PK\x03\x04 not really a zip", "corrupt torch file"),
    ],
)
def test_corrupt_weights_name_the_file(tmp_path, name, data, reason):
    _break(tmp_path, name, data)
    if name != "model.safetensors":  # model.safetensors is read first
        (tmp_path / "model.safetensors").unlink()
    for load in (GPT.from_pretrained, lambda d: load_weights(tiny_model(), d)):
        with pytest.raises(
            CheckpointError, match=rf"{name} cannot be read .* truncated or corrupt"
        ):
            load(tmp_path)


def test_truncated_tensor_data_names_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # header intact, data cut short
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "data, match",
    [
        (b'{"n_layer": 2, ', r"config\.json is not readable JSON"),
        (b"\xff\xfe{}", r"config\.json is not readable JSON"),
        (b"[1, 2]", r"config\.json holds a JSON list, not an object"),
    ],
)
def test_broken_config_json_names_the_file(tmp_path, data, match):
    _break(tmp_path, "config.json", data)
    with pytest.raises(CheckpointError, match=match):
        GPT.from_pretrained(tmp_path)


def test_invalid_config_values_name_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 0}))
    with pytest.raises(CheckpointError, match=r"config\.json does not describe a valid config"):
        GPT.from_pretrained(tmp_path)


def test_sharded_checkpoint_faults_name_the_index(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(CheckpointError, match=r"index\.json lists shards .*model-00002-of-00002"):
        GPT.from_pretrained(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json has no weight_map"):
        GPT.from_pretrained(tmp_path)
    index.write_text("{")
    with pytest.raises(CheckpointError, match=r"index\.json is not readable JSON"):
        GPT.from_pretrained(tmp_path)


def test_a_torch_file_without_a_state_dict_is_refused(tmp_path):
    model = tiny_model()
    Config.save(model.config, tmp_path / "config.json")
    torch.save([torch.zeros(2)], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt does not hold a state dict"):
        GPT.from_pretrained(tmp_path)


def test_tied_tensors_stored_under_both_names(tmp_path):
    """A plain ``torch.save(model.state_dict())`` stores a tied tensor under both
    names; equal copies load, different ones are refused with the reason."""
    model = tiny_model(tie_embeddings=True)
    Config.save(model.config, tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert_same_state(GPT.from_pretrained(tmp_path), model)

    state = {name: t.clone() for name, t in model.state_dict().items()}
    state["lm_head.weight"] += 1
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"different lm_head\.weight and .*tie_embeddings"):
        GPT.from_pretrained(tmp_path)
    untied = GPT(Config(**TINY, tie_embeddings=False))
    tensors, _ = read_tensors(tmp_path)
    load_state(untied, tensors)
    assert torch.equal(untied.lm_head.weight, state["lm_head.weight"])


def test_the_checkpoint_layer_does_not_import_the_model():
    """Dependencies run one way, model -> checkpoint -> hf: neither file layer imports
    the model (``GPT.from_pretrained`` passes itself as ``model_class``)."""
    lab_dir = Path(lab.checkpoint.__file__).parent
    for path in [lab_dir / "checkpoint.py", *(lab_dir / "hf").glob("*.py")]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & {"lab.model", "lab.api", "lab.train"}, path
