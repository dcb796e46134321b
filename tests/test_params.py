import pytest
import torch

from _tiny import tiny_llama
from alignscope.params import select_params


def test_all_selects_every_trainable_parameter_in_order():
    model = tiny_llama()
    sel = select_params(model)
    assert sel.names == [n for n, _ in model.named_parameters()]
    assert sel.size == sum(p.numel() for p in model.parameters())


def test_flatten_unflatten_round_trip_and_views():
    model = tiny_llama()
    sel = select_params(model, ["*.mlp.*", "lm_head.weight"], group="layer")
    flat = sel.flatten(sel.tensors(model)).detach()
    back = sel.unflatten(flat)
    for name, tensor in sel.tensors(model).items():
        assert torch.equal(back[name], tensor)
    # unflatten returns views: writing through them changes the flat vector
    back["lm_head.weight"].zero_()
    assert float(flat[sel.offsets[-2] :].abs().sum()) == 0.0
    batch = torch.stack([flat, 2 * flat])
    assert sel.unflatten(batch)["model.layers.0.mlp.up_proj.weight"].shape[0] == 2


def test_glob_selection_and_layer_blocks():
    model = tiny_llama()
    sel = select_params(model, "model.layers.*.self_attn.*", group="layer")
    assert all(".self_attn." in n for n in sel.names)
    assert set(sel.blocks) == {"layer.0", "layer.1"}
    idx = torch.cat([sel.block_index(b) for b in sel.blocks])
    assert sorted(idx.tolist()) == list(range(sel.size))


def test_module_blocks_group_weights_of_one_module():
    model = tiny_llama()
    sel = select_params(model, "model.layers.0.*", group="module")
    assert "model.layers.0.self_attn.q_proj" in sel.blocks
    assert len(sel.blocks["model.layers.0.self_attn.q_proj"]) == 1


def test_selection_matching_nothing_lists_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matched nothing.*model\.embed_tokens\.weight"):
        select_params(model, "*.nonexistent.*")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        select_params(model, "lora")


def test_all_with_everything_frozen_is_an_error():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        select_params(model, "all")


def test_lora_selection_picks_adapter_weights_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    sel = select_params(model, "lora")
    assert sel.names and all("lora_" in n for n in sel.names)
    assert sel.size == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_train_only_leaves_exactly_the_selection_trainable():
    model = tiny_llama()
    sel = select_params(model, ["*.mlp.*"])
    sel.train_only(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == sel.names and len(trainable) < len(list(model.parameters()))
