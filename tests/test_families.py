"""Family adapters: registry, loading from a local directory, model_info, layer paths, quirks."""

from __future__ import annotations

import pytest
import torch

from capture.family import _max_memory, _revision, adapter_for, load_model, supported_families
from schemas.config import ModelConfig
from schemas.errors import GapError

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
IMAGE_TOKEN = {"llava": "<image>", "llava_next": "<image>"}


def test_registry_lists_every_family():
    assert supported_families() == sorted(FAMILIES)
    for family in FAMILIES:
        assert adapter_for(family).family == family  # model_type == family name for all six


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(GapError) as err:
        adapter_for("gemma3")
    message = str(err.value)
    assert "'gemma3'" in message and "\n" not in message
    assert all(f in message for f in FAMILIES)
    with pytest.raises(GapError, match="model.family 'idefics'"):
        adapter_for("llava", family="idefics")


def test_explicit_family_wins_over_model_type():
    assert adapter_for("some_finetune", family="qwen2_vl").family == "qwen2_vl"


@pytest.mark.parametrize("family", FAMILIES)
def test_load_local_checkpoint(family, tiny_checkpoint):
    path = tiny_checkpoint(family, n_layers=3)
    loaded = load_model(ModelConfig(path=str(path), dtype="float32"))
    info = loaded.info
    assert (info["family"], info["model_type"], info["n_layers"], info["hidden_size"]) == (family, family, 3, 64)
    token = IMAGE_TOKEN.get(family, "<|image_pad|>")
    assert info["image_token_id"] == loaded.processor.tokenizer.convert_tokens_to_ids(token)
    # the tiny Qwen3-VL towers inject DeepStack features after LM layers 0 and 1
    assert info["deepstack_layers"] == ([0, 1] if family.startswith("qwen3") else [])
    assert info["path"] == str(path) and info["dtype"] == "float32"
    assert loaded.input_device.type == "cpu"  # device_map auto -> CPU without CUDA
    blocks = loaded.layers()
    assert len(blocks) == 3 and all(type(b).__name__.endswith("DecoderLayer") for b in blocks)
    # the blocks are the language model's, not the vision tower's
    lm_layers = loaded.model.model.language_model.layers
    assert all(a is b for a, b in zip(blocks, lm_layers))


def test_layer_envoys_wrap_the_same_blocks(tiny_checkpoint):
    import nnsight

    loaded = load_model(ModelConfig(path=str(tiny_checkpoint("qwen3_vl", n_layers=3)), dtype="float32"))
    envoy = nnsight.NNsight(loaded.model)
    envoys = loaded.layer_envoys(envoy)
    assert len(envoys) == 3
    assert all(e._module is b for e, b in zip(envoys, loaded.layers()))


def test_forward_inputs_quirks(tiny_checkpoint):
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask,
              "mm_token_type_ids": torch.zeros(2, 3, dtype=torch.long), "token_type_ids": mask}
    llava = load_model(ModelConfig(path=str(tiny_checkpoint("llava", n_layers=3)), dtype="float32"))
    got = llava.forward_inputs(inputs)
    assert set(got) == {"input_ids", "attention_mask", "position_ids"}
    assert got["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]  # left padding starts at 0
    qwen = load_model(ModelConfig(path=str(tiny_checkpoint("qwen2_vl", n_layers=3)), dtype="float32"))
    assert set(qwen.forward_inputs(inputs)) == {"input_ids", "attention_mask", "mm_token_type_ids"}


def test_dtype_is_applied(tiny_checkpoint):
    loaded = load_model(ModelConfig(path=str(tiny_checkpoint("llava", n_layers=3)), dtype="bfloat16"))
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_missing_checkpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for path in (str(tmp_path / "nowhere"), "./nowhere", "../nowhere", "~/nowhere", "models/org/name"):
        with pytest.raises(GapError) as err:
            load_model(ModelConfig(path=path, dtype="float32"))
        assert str(err.value) == f"model.path {path}: no such directory"
    (tmp_path / "empty").mkdir()
    for path in (str(tmp_path / "empty"), "empty"):
        with pytest.raises(GapError) as err:
            load_model(ModelConfig(path=path, dtype="float32"))
        assert str(err.value) == f"model.path {path}: no config.json (not a transformers checkpoint directory)"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GapError) as err:
        load_model(ModelConfig(path=str(tmp_path / "config.json"), dtype="float32"))
    assert str(err.value) == f"model.path {tmp_path / 'config.json'}: not a directory"


def test_hub_ids_go_to_transformers_and_home_paths_load(tiny_checkpoint, tmp_path, monkeypatch):
    # an org/name id that is no local directory is looked up by transformers (its offline cache)
    import transformers

    asked = []

    def from_pretrained(path, **kwargs):
        asked.append(path)
        raise OSError("not in the cache")

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
        with pytest.raises(GapError, match=r"^model.path llava-hf/llava-1.5-7b-hf: cannot read the model config"):
            load_model(ModelConfig(path="llava-hf/llava-1.5-7b-hf", dtype="float32"))
    assert asked == ["llava-hf/llava-1.5-7b-hf"]
    path = tiny_checkpoint("llava", n_layers=2)
    monkeypatch.setenv("HOME", str(path.parent))
    assert load_model(ModelConfig(path=f"~/{path.name}", dtype="float32")).n_layers == 2


def test_revision_from_hub_cache_path(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--org--m" / "snapshots" / commit
    snap.mkdir(parents=True)

    class Config:
        _commit_hash = None

    assert _revision(str(snap), Config(), None) == commit
    assert _revision(str(tmp_path), Config(), "main") == "main"
    Config._commit_hash = "f" * 40
    assert _revision(str(tmp_path), Config(), None) == "f" * 40


def test_max_memory_gpu_keys_become_ints():
    assert _max_memory({"0": "70GiB", "1": "70GiB", "cpu": "100GiB"}) == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    assert _max_memory(None) is None
