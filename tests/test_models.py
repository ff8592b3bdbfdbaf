"cxrlt.models: every paper backbone builds, proxies train on CPU, weights load from files and caches, never silently."
import os, time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from cxrlt.models import (CPU_PROXIES, GRADCAM_LAYERS, MODELS, PAPER_BACKBONES, NormedLinear, PretrainedWeightsError,
                          complexity_table, create_model, forward_features, forward_head, get_classifier,
                          gradcam_target_layer, model_family, resolve_model_name)

PROXIES = sorted(set(CPU_PROXIES.values()))
CLASSIFIER_PREFIX = {'resnet': 'fc.', 'densenet': 'classifier.', 'efficientnet': 'classifier.',
                     'efficientformerv2': 'head.', 'convnext': 'head.fc.'}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    "An empty weight cache and a hub endpoint on a closed local port: what an offline machine sees."
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'torch_hub'))
    for k in ['HF_HUB_OFFLINE', 'http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY']:
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def backbone_state(model):
    prefix = CLASSIFIER_PREFIX[model_family(model)]
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


def assert_same_backbone(model, reference):
    got, want = backbone_state(model), backbone_state(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.mark.parametrize('name', list(PAPER_BACKBONES))
def test_paper_backbone_builds_and_returns_30_logits(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = m(x)
        feats = forward_features(m, x)
        seen = []
        hook = gradcam_target_layer(m).register_forward_hook(lambda mod, i, o: seen.append(o))
        fmap = m.forward_features(x)
        hook.remove()
    assert logits.shape == (2, 30) and torch.isfinite(logits).all()
    assert feats.shape == (2, m.num_features)
    torch.testing.assert_close(forward_head(m, feats), logits)
    assert seen[-1].shape == (2, m.num_features, 2, 2)
    torch.testing.assert_close(seen[-1], fmap)
    assert m.cxrlt_config['timm_name'] == PAPER_BACKBONES[name]


@pytest.mark.parametrize('name', PROXIES)
def test_proxy_trains_on_cpu_at_64px(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64, head='normed' if name == 'convnext_atto' else 'linear')
    x, y = torch.randn(4, 3, 64, 64), (torch.rand(4, 30) < 0.2).float()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    loss = nn.functional.binary_cross_entropy_with_logits(m(x), y)
    loss.backward()
    grads = {k: p.grad for k, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [k for k, g in grads.items() if g is None]
    assert grads[next(iter(grads))].abs().sum() > 0  # the stem learns
    opt.step()


@pytest.mark.parametrize('name', PROXIES)
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64, head='normed').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = m(x)
        m = m.to(memory_format=torch.channels_last)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = m(x.contiguous(memory_format=torch.channels_last))
    assert low.dtype == torch.float32  # the cosine head computes in float32
    assert torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.1  # cosines: bf16 backbone rounding only


@pytest.mark.parametrize('name', PROXIES)
@pytest.mark.parametrize('fmt', ['pth', 'safetensors', 'wrapped'])
def test_local_weights_round_trip(name, fmt, tmp_path):
    torch.manual_seed(1)
    imagenet = create_model(name, num_classes=1000)
    path = tmp_path / f'weights.{"safetensors" if fmt == "safetensors" else "pth"}'
    sd = imagenet.state_dict()
    if fmt == 'safetensors': save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else: torch.save({'state_dict': sd, 'epoch': 3} if fmt == 'wrapped' else sd, path)
    torch.manual_seed(2)
    m = create_model(name, pretrained_path=path)
    assert_same_backbone(m, imagenet)
    assert get_classifier(m).weight.shape == (30, m.num_features)
    assert m.cxrlt_config['weights'] == str(path)
    normed = create_model(name, pretrained_path=path, head='normed')
    assert_same_backbone(normed, imagenet)
    assert isinstance(get_classifier(normed), NormedLinear)


def test_weights_of_another_architecture_are_an_error(tmp_path):
    path = tmp_path / 'convnext_atto.pth'
    torch.save(create_model('convnext_atto', num_classes=1000).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=f'{path} does not fit resnet10t'):
        create_model('resnet10t', pretrained_path=path)
    with pytest.raises(PretrainedWeightsError, match='could not load pretrained weights for resnet14t'):
        # same key names, other shapes (resnet10t has fewer blocks and channels)
        create_model('resnet14t', pretrained_path=_saved(create_model('resnet10t', num_classes=1000), tmp_path / 'r10.pth'))
    with pytest.raises(FileNotFoundError, match='missing.pth does not exist'):
        create_model('resnet10t', pretrained_path=tmp_path / 'missing.pth')


def _saved(model, path):
    torch.save(model.state_dict(), path)
    return path


def test_greyscale_input_sums_the_rgb_stem(tmp_path):
    imagenet = create_model('resnet10t', num_classes=1000)
    m = create_model('resnet10t', in_chans=1, pretrained_path=_saved(imagenet, tmp_path / 'w.pth'))
    w3 = imagenet.conv1[0].weight
    torch.testing.assert_close(m.conv1[0].weight, w3.sum(dim=1, keepdim=True))
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 30)


def test_efficientformerv2_pretrained_at_another_size(tmp_path):
    torch.manual_seed(0)
    src = create_model('efficientformerv2_s0', num_classes=1000)
    m = create_model('efficientformerv2_s0', img_size=96, pretrained_path=_saved(src, tmp_path / 'ef.pth'))
    got, want = m.state_dict(), src.state_dict()
    resized = [k for k in want if k.endswith('attention_biases')]
    assert resized and all(got[k].shape != want[k].shape for k in resized)
    same = [k for k in want if k not in resized and not k.startswith('head.')]
    assert all(torch.equal(got[k], want[k]) for k in same)
    assert m(torch.randn(2, 3, 96, 96)).shape == (2, 30)


def test_pretrained_without_network_names_what_to_fetch(no_hub):
    t0 = time.time()
    with pytest.raises(PretrainedWeightsError) as e:
        create_model('convnext_large', pretrained=True)
    assert time.time() - t0 < 20
    msg = str(e.value)
    assert "'convnext_large.fb_in22k_ft_in1k' are not in the local cache" in msg
    assert "file 'model.safetensors' of the hub repository 'timm/convnext_large.fb_in22k_ft_in1k'" in msg
    assert 'pretrained_path=' in msg


def test_offline_mode_is_respected(no_hub, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(PretrainedWeightsError, match='HF_HUB_OFFLINE is set'):
        create_model('resnet10t', pretrained=True)


def test_pretrained_from_the_hub_cache_offline(no_hub):
    "Weights already in the Hugging Face cache load without touching the (unreachable) hub."
    torch.manual_seed(3)
    imagenet = create_model('resnet10t', num_classes=1000)
    repo = no_hub / 'hf' / 'models--timm--resnet10t.c3_in1k'
    commit = 'a' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, repo / 'snapshots' / commit / 'model.safetensors')
    t0 = time.time()
    m = create_model('resnet10t', pretrained=True)
    assert time.time() - t0 < 20
    assert_same_backbone(m, imagenet)
    assert m.cxrlt_config['weights'].endswith('model.safetensors')


def test_pretrained_from_the_torch_hub_cache_offline(no_hub):
    "Weights that an older timm downloaded by URL into torch.hub's cache are used too."
    from timm.models import get_pretrained_cfg
    imagenet = create_model('resnet10t', num_classes=1000)
    url = get_pretrained_cfg('resnet10t.c3_in1k').url
    ckpt = no_hub / 'torch_hub' / 'checkpoints' / url.rsplit('/', 1)[1]
    ckpt.parent.mkdir(parents=True)
    _saved(imagenet, ckpt)
    assert_same_backbone(create_model('resnet10t', pretrained=True), imagenet)


def test_bad_names_list_the_valid_ones():
    with pytest.raises(KeyError) as e:
        create_model('resnet18')
    assert all(n in str(e.value) for n in MODELS)
    with pytest.raises(KeyError, match='valid tags: .*tv_in1k'):
        resolve_model_name('resnet50.in22k')
    with pytest.raises(ValueError, match="head must be 'linear' or 'normed'"):
        create_model('resnet10t', head='cosine')
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        create_model('resnet10t', num_classes=0)


def test_every_family_has_its_layers():
    families = {model_family(create_model(n, img_size=64)) for n in PROXIES}
    assert families == set(GRADCAM_LAYERS)


def test_complexity_table():
    t = complexity_table(['resnet50', 'resnet101', 'efficientformerv2_s0'], sizes=(224, 512))
    assert list(t.index) == ['resnet50', 'resnet101', 'efficientformerv2_s0']
    assert t.loc['resnet50', 'params_M@224'] == t.loc['resnet50', 'params_M@512']
    # EfficientFormerV2's attention-bias tables grow with the feature maps
    assert t.loc['efficientformerv2_s0', 'params_M@512'] > t.loc['efficientformerv2_s0', 'params_M@224']
    # ResNet-101 adds 17 bottleneck blocks to ResNet-50's 16: about 1.9x the multiply-adds (7.8 vs 4.1 G, torchvision)
    assert 1.8 < t.loc['resnet101', 'GFLOPs@224'] / t.loc['resnet50', 'GFLOPs@224'] < 2.0


def test_efficientformerv2_refuses_sizes_it_cannot_run():
    from cxrlt.models import create_model
    with pytest.raises(ValueError, match='divisible by 32'):
        create_model('efficientformerv2_s0', img_size=48)
    m = create_model('efficientformerv2_s0', img_size=64).eval()
    with torch.no_grad(): assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 30)
