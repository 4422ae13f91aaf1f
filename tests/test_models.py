import pytest
import torch

from bloodcell.models import REGISTRY, create_model, get_spec, load_model, save_model

STUDY = ["dnn", "cnn", "cnn-aug", "cnn3", "lite0-frozen", "lite0-finetune"]


def test_registry_has_six_generations_in_order():
    gens: dict[int, str] = {}
    for name, spec in REGISTRY.items():  # the first of a generation is the study's; later ones
        if spec.generation:              # (lite2-frozen for 5) are alternatives to it
            gens.setdefault(spec.generation, name)
    assert [gens[g] for g in range(1, 7)] == STUDY
    assert "resnet50" in REGISTRY and "lite0-recipe" in REGISTRY
    with pytest.raises(ValueError, match="unknown model"):
        get_spec("vgg")


@pytest.mark.parametrize("name", STUDY + ["lite0-recipe"])
def test_forward_shapes(name):
    m = create_model(name, 8, 64, pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        assert m(x).shape == (2, 8)


def test_study_architectures_faithful():
    dnn = create_model("dnn", 8, 32)
    linears = [m for m in dnn if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [128] * 5 + [8]
    cnn3 = create_model("cnn3", 8, 64)
    convs = [m for m in cnn3 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(8, (5, 5)), (16, (3, 3)), (32, (3, 3))]
    assert not any(type(m).__name__ == "Augment" for m in create_model("cnn", 8, 32))
    assert any(type(m).__name__ == "Augment" for m in create_model("cnn-aug", 8, 32))


def test_lite0_loads_shipped_imagenet_weights():
    from bloodcell.models import load_state_dict_file, lite0_weights_path
    m = create_model("lite0-finetune", 8, 64)
    sd = load_state_dict_file(lite0_weights_path())
    assert torch.equal(m.backbone._conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(m.backbone._blocks[15]._project_conv.weight, sd["_blocks.15._project_conv.weight"])
    assert all(p.requires_grad for p in m.backbone.parameters())


def test_frozen_backbone_not_trained_and_keeps_bn_stats():
    m = create_model("lite0-frozen", 8, 64).train()
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert m.head.weight.requires_grad
    assert not m.backbone.training and m.augment.training
    before = m.backbone._bn0.running_mean.clone()
    m(torch.rand(4, 3, 64, 64) * 255)
    assert torch.equal(before, m.backbone._bn0.running_mean)


def test_resnet50_needs_local_weights(tmp_path):
    with pytest.raises(ValueError, match="local file"):
        create_model("resnet50", 8, 64, pretrained=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("resnet50", 8, 64, weights=str(tmp_path / "missing.pth"))
    from torchvision.models import resnet50
    from safetensors.torch import save_file
    ref = resnet50(weights=None)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "r50.safetensors")
    m = create_model("resnet50", 8, 64, weights=str(tmp_path / "r50.safetensors"))
    assert torch.equal(m.backbone[0].weight, ref.conv1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match="not torchvision ResNet-50"):
        create_model("resnet50", 8, 64, weights=str(bad))


@pytest.mark.parametrize("fp16", [False, True])
def test_save_load_roundtrip_same_predictions(tmp_path, fp16):
    torch.manual_seed(0)  # fixed inputs: fp16 weights move logits by ~0.003, which flips a near-tie
    m = create_model("lite0-finetune", 8, 64).eval()
    meta = {"architecture": "lite0-finetune", "classes": [str(i) for i in range(8)], "image_size": 64}
    save_model(m, meta, tmp_path, fp16=fp16)
    assert not list(tmp_path.glob("*.pt*")) and (tmp_path / "model.safetensors").exists()
    m2, meta2 = load_model(tmp_path)
    x = torch.rand(3, 3, 64, 64) * 255
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert torch.allclose(a, b, atol=0.05 if fp16 else 1e-5)
    assert meta2.weights_dtype == ("float16" if fp16 else "float32")


def test_load_model_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path)


def test_models_cli_lists_the_registry(capsys):
    """`bloodcell models`: every registered architecture, the study's six generations numbered."""
    from bloodcell.cli import main
    from bloodcell.models import REGISTRY
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(REGISTRY)
    assert set(REGISTRY) >= {"dnn", "cnn", "cnn-aug", "cnn3", "lite0-frozen", "lite0-finetune",
                             "lite0-recipe", "resnet50"}
    gens = {ln.split()[0]: ln.split()[2] for ln in lines if ln.split()[1] == "gen"}
    assert gens == {"dnn": "1", "cnn": "2", "cnn-aug": "3", "cnn3": "4", "lite0-frozen": "5",
                    "lite0-finetune": "6", "lite2-frozen": "5"}  # lite2-frozen: an alternative gen 5
    assert all(REGISTRY[n].description in ln for n, ln in zip(REGISTRY, lines))
