"""LoRA in peft's files: an adapter lab writes, loaded by peft onto the Hugging Face
form of the base model, gives lab's logits; an adapter peft writes, loaded by lab,
gives peft's; and what lab cannot express is refused with the reason."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lab import GPT, Config
from lab.checkpoint import save_pretrained
from lab.errors import AdapterError
from lab.finetune.lora import TARGETS, apply_lora
from lab.finetune.peft import CONFIG_FILE, WEIGHTS_FILE, load_peft, save_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
pytestmark = [  # peft's notes on tied heads and saved embeddings; transformers' deprecations
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers"),
]

LLAMA_LIKE = dict(
    n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=50, block_size=32,
    intermediate_size=48, positional="rope", norm_class_name="RMSNorm",
    mlp_class_name="GatedMLP", bias=False,
)  # fmt: skip
HF_NAMES = {"query": ["q_proj"], "key": ["k_proj"], "value": ["v_proj"],
            "projection": ["o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
            "head": ["lm_head"]}  # fmt: skip
CASES = {  # (tie_embeddings, lab targets)
    "all-targets": (False, list(TARGETS)),
    "tied-head-key": (True, ["key", "head"]),
}


def base_model(tie: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(Config(**LLAMA_LIKE, tie_embeddings=tie)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))


def hf_base(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager"
    ).eval()


def randomise_B(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)


@pytest.mark.parametrize("case", CASES)
def test_lab_adapter_loads_in_peft_with_the_same_logits(case, tmp_path) -> None:
    tie, targets = CASES[case]
    model = base_model(tie)
    save_pretrained(model, tmp_path / "hf", format="hf")
    apply_lora(model, r=2, lora_alpha=6.0, targets=targets)
    randomise_B(model)
    save_peft(model, tmp_path / "peft", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["target_modules"] == sorted(n for t in targets for n in HF_NAMES[t])
    assert (config["r"], config["lora_alpha"]) == (2, 6.0)

    hf = hf_base(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        base_logits = hf(x).logits
        ours = model(x)
        assert not torch.allclose(ours, base_logits, atol=1e-2)  # the LoRA shows
        wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
        torch.testing.assert_close(wrapped(x).logits, ours, atol=1e-4, rtol=1e-4)

    # and back into lab: the same model, exactly
    restored = load_peft(GPT.from_pretrained(tmp_path / "hf").eval(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lab_with_the_same_logits(case, tmp_path) -> None:
    tie, targets = CASES[case]
    save_pretrained(base_model(tie), tmp_path / "hf", format="hf")
    modules = [n for t in targets for n in HF_NAMES[t]]
    wrapped = peft.get_peft_model(
        hf_base(tmp_path / "hf"),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=modules),
    ).eval()
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
            if "lora_A" in name and "up_proj" in name:  # lab's fused [gate | up]: one A
                param.copy_(wrapped.get_parameter(name.replace("up_proj", "gate_proj")))
    wrapped.save_pretrained(tmp_path / "peft")

    model = load_peft(GPT.from_pretrained(tmp_path / "hf").eval(), tmp_path / "peft")
    assert model.adapters["lora"] == {
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "targets": sorted(targets),
    }  # fmt: skip
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), wrapped(x).logits, atol=1e-4, rtol=1e-4)


def test_what_lab_cannot_express_is_refused(tmp_path) -> None:
    save_pretrained(base_model(False), tmp_path / "hf", format="hf")
    wrapped = peft.get_peft_model(
        hf_base(tmp_path / "hf"), peft.LoraConfig(r=2, target_modules=HF_NAMES["mlp"])
    )
    wrapped.save_pretrained(tmp_path / "peft")  # gate_proj and up_proj have their own A
    with pytest.raises(AdapterError, match=r"gate \| up"):
        load_peft(base_model(False), tmp_path / "peft")
    edit_config(tmp_path / "peft", target_modules=["gate_proj"])
    with pytest.raises(AdapterError, match="mlp"):  # half of the MLP is no lab target
        load_peft(base_model(False), tmp_path / "peft")
    for option in (dict(use_rslora=True), dict(use_dora=True), dict(bias="all")):
        edit_config(tmp_path / "peft", target_modules=["q_proj"], **option)
        with pytest.raises(AdapterError, match=next(iter(option))):
            load_peft(base_model(False), tmp_path / "peft")
    edit_config(tmp_path / "peft", use_rslora=False, use_dora=False, bias="none",
                target_modules=".*q_proj")  # fmt: skip
    with pytest.raises(AdapterError, match="regular expression"):
        load_peft(base_model(False), tmp_path / "peft")
    edit_config(tmp_path / "peft", target_modules=["qkv_proj"])  # Phi-3's fused q, k, v
    with pytest.raises(AdapterError, match=r"\['qkv_proj'\] .* no lab LoRA target"):
        load_peft(base_model(False), tmp_path / "peft", model_type="phi3")
    edit_config(tmp_path / "peft", target_modules=["q_proj"])
    (tmp_path / "peft" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match=WEIGHTS_FILE):
        load_peft(base_model(False), tmp_path / "peft")
    with pytest.raises(AdapterError, match=CONFIG_FILE):
        load_peft(base_model(False), tmp_path / "hf")

    phi3 = apply_lora(base_model(False), targets=["query"])  # Phi-3 fuses q, k, v in one layer
    with pytest.raises(AdapterError, match="qkv_proj"):
        save_peft(phi3, tmp_path / "phi3", model_type="phi3")
    with pytest.raises(AdapterError, match="no LoRA"):
        save_peft(base_model(False), tmp_path / "none")
    with pytest.raises(AdapterError, match="not a lab GPT"):
        load_peft(torch.nn.Linear(2, 2), tmp_path / "peft")


def edit_config(directory, **changes) -> None:
    path = directory / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
