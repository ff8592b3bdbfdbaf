"cxrlt.models: every paper backbone builds, proxies train on CPU, weights load from files and caches, never silently."
import time

import huggingface_hub
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import cxrlt.models
from cxrlt.models import (BACKBONES, CONVNEXT, RESNET, Backbone, Family, NormedLinear, PretrainedWeightsError,
                          backbone, complexity_table, create_model, forward_features, forward_head, get_classifier,
                          gradcam_target_layer, model_family, paper_backbone, paper_backbones, register_backbone,
                          reset_classifier, resolve_model_name)

# what the registry must hold, written out independently of it
PINNED = {
    'resnet50': 'resnet50.a1_in1k', 'resnet101': 'resnet101.a1h_in1k', 'densenet121': 'densenet121.ra_in1k',
    'densenet169': 'densenet169.tv_in1k', 'efficientformerv2_s': 'efficientformerv2_s2.snap_dist_in1k',
    'efficientnetv2_s': 'tf_efficientnetv2_s.in1k', 'convnext_base': 'convnext_base.fb_in22k_ft_in1k',
    'convnext_large': 'convnext_large.fb_in22k_ft_in1k', 'resnet10t': 'resnet10t.c3_in1k',
    'resnet14t': 'resnet14t.c3_in1k', 'efficientformerv2_s0': 'efficientformerv2_s0.snap_dist_in1k',
    'efficientformerv2_s1': 'efficientformerv2_s1.snap_dist_in1k',
    'efficientformerv2_s2': 'efficientformerv2_s2.snap_dist_in1k', 'tf_efficientnetv2_b0': 'tf_efficientnetv2_b0.in1k',
    'convnext_atto': 'convnext_atto.d2_in1k', 'convnext_femto': 'convnext_femto.d1_in1k',
    'densenet121_half': 'densenet121.ra_in1k', 'densenet169_half': 'densenet169.tv_in1k',
    'convnextv2_atto': 'convnextv2_atto.fcmae_ft_in1k', 'convnextv2_base': 'convnextv2_base.fcmae_ft_in22k_in1k',
}
BEYOND_PAPER = {'convnextv2_base': 'convnextv2_atto'}   # the strong preset's backbone and its CPU proxy
PAPER = {  # name: (paper name, CPU proxy), in the paper's order
    'resnet50': ('ResNet-50', 'resnet10t'), 'resnet101': ('ResNet-101', 'resnet14t'),
    'densenet121': ('DenseNet-121', 'densenet121_half'), 'densenet169': ('DenseNet-169', 'densenet169_half'),
    'efficientformerv2_s': ('EfficientFormerV2-S', 'efficientformerv2_s0'),
    'efficientnetv2_s': ('EfficientNetV2-S (public code)', 'tf_efficientnetv2_b0'),
    'convnext_base': ('ConvNeXt-Base', 'convnext_atto'), 'convnext_large': ('ConvNeXt-Large', 'convnext_femto'),
}
PROXIES = sorted({proxy for _, proxy in PAPER.values()})
CLASSIFIER_PREFIX = {'resnet': 'fc.', 'densenet': 'classifier.', 'efficientnet': 'classifier.',
                     'efficientformerv2': 'head.', 'convnext': 'head.fc.'}
GRADCAM_LAYER = {'resnet': 'layer4', 'densenet': 'features.norm5', 'efficientnet': 'bn2',
                 'efficientformerv2': 'norm', 'convnext': 'stages.3'}


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
    prefix = CLASSIFIER_PREFIX[model_family(model).name]
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


def assert_same_backbone(model, reference):
    got, want = backbone_state(model), backbone_state(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.mark.parametrize('name', list(PAPER))
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
    assert m.cxrlt_config['timm_name'] == PINNED[name]


@pytest.mark.parametrize('name', PROXIES)
def test_proxy_trains_on_cpu_at_64px(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64, head='normed' if name == 'convnext_atto' else 'linear')
    x, y = torch.randn(4, 3, 64, 64), (torch.rand(4, 30) < 0.2).float()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    loss = nn.functional.binary_cross_entropy_with_logits(m(x), y)
    loss.backward()
    grads = {k: p.grad for k, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [k for k, g in grads.items() if g is None]
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
        r10 = _saved(create_model('resnet10t', num_classes=1000), tmp_path / 'r10.pth')
        create_model('resnet14t', pretrained_path=r10)
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
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()},
              repo / 'snapshots' / commit / 'model.safetensors')
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
    assert all(n in str(e.value) for n in PINNED)
    assert "unknown model 'resnet18' (did you mean resnet14t or resnet10t or resnet101?); valid names: " in str(e.value)
    with pytest.raises(KeyError, match='valid tags: .*tv_in1k'):
        resolve_model_name('resnet50.in22k')
    with pytest.raises(ValueError, match="head must be 'linear' or 'normed'"):
        create_model('resnet10t', head='cosine')
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        create_model('resnet10t', num_classes=0)


def test_every_family_has_its_layers():
    families = {model_family(create_model(n, img_size=64)) for n in PROXIES}
    assert families == {b.family for b in BACKBONES.values()}   # every family has a CPU proxy
    assert {f.name: f.gradcam_layer for f in families} == GRADCAM_LAYER
    assert {f.name: f.classifier_layer + '.' for f in families} == CLASSIFIER_PREFIX


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


# ---------------------------------------------------------------- the registry
def test_registry_keeps_the_pinned_names_tags_paper_names_and_proxies():
    assert {n: b.timm_name for n, b in BACKBONES.items()} == PINNED
    assert [b.name for b in paper_backbones()] == list(PAPER)
    assert {b.name: (b.paper_name, b.cpu_proxy) for b in paper_backbones()} == PAPER
    assert all(b.paper_name is None and b.cpu_proxy == BEYOND_PAPER.get(b.name)
               for b in BACKBONES.values() if b.name not in PAPER)
    assert all(isinstance(b, Backbone) and b.name == n for n, b in BACKBONES.items())
    for name, timm_name in PINNED.items():
        assert timm_name in timm.list_pretrained(timm_name.split('.')[0] + '.*'), name


def test_lookups_by_name_and_paper_name():
    assert backbone('resnet50.tv_in1k') is BACKBONES['resnet50']
    assert paper_backbone('ConvNeXt-Large') is BACKBONES['convnext_large']
    assert paper_backbone('DenseNet-169').cpu_proxy == 'densenet169_half'
    with pytest.raises(KeyError, match="unknown model 'convnext_larg' \\(did you mean convnext_large"):
        backbone('convnext_larg')
    with pytest.raises(KeyError) as e:
        paper_backbone('ViT-B')
    assert "unknown paper model 'ViT-B'; known: " + ', '.join(p for p, _ in PAPER.values()) in str(e.value)


@pytest.fixture
def registry(monkeypatch):
    "A copy of the registry that a test may add to."
    monkeypatch.setattr(cxrlt.models, 'BACKBONES', dict(BACKBONES))
    return cxrlt.models.BACKBONES


def test_register_backbone_checks_each_record(registry):
    assert register_backbone('resnet50', 'resnet50.a1_in1k', RESNET, 'ResNet-50', 'resnet10t') is registry['resnet50']
    cases = [
        (('resnet50', 'resnet50.tv_in1k', RESNET), "backbone 'resnet50' is already registered as Backbone("),
        (('r18', 'resnet18.no_such_tag', RESNET), "timm_name 'resnet18.no_such_tag' must pin one of the "
                                                   "pretrained tags"),
        (('r18', 'resnet18', RESNET), 'must pin one of the pretrained tags timm has for resnet18: '),
        (('r18', 'resnet_18.a1_in1k', RESNET), "r18: timm has no model 'resnet_18'"),
        (('r18', 'resnet18.a1_in1k', CONVNEXT),
         "r18: timm builds resnet18 in timm.models.resnet, but family 'convnext' is timm.models.convnext.ConvNeXt"),
        (('r18', 'resnet18.a1_in1k', RESNET, None, 'resnet18_small'),
         "cpu_proxy 'resnet18_small' is not registered"),
        (('r18', 'resnet18.a1_in1k', RESNET, None, 'densenet121'),
         "cpu_proxy 'densenet121' is a densenet, not a resnet"),
        (('r18', 'resnet18.a1_in1k', RESNET, 'ResNet-50'), "paper name 'ResNet-50' is already the name of 'resnet50'"),
        (('r18', 'resnet18.a1_in1k', Family('resnet', timm.models.resnet.ResNet, 'layer3', 'fc')),
         'one family per name and per class'),
        (('resnet.18', 'resnet18.a1_in1k', RESNET), "backbone name must be a non-empty string without '.'"),
    ]
    for args, message in cases:
        with pytest.raises((ValueError, TypeError)) as e:
            register_backbone(*args)
        assert message in str(e.value), (args, str(e.value))
    with pytest.raises(TypeError, match="r18: family must be a Family, got 'resnet'"):
        register_backbone('r18', 'resnet18.a1_in1k', 'resnet')
    assert set(registry) == set(PINNED)


def test_create_model_checks_the_class_timm_builds(registry):
    "A record that slipped past the entrypoint check is caught when the model is built."
    registry['odd'] = Backbone('odd', 'resnet10t.c3_in1k', Family('densenet', timm.models.densenet.DenseNet,
                                                                    'features.norm5', 'classifier'))
    with pytest.raises(TypeError, match="odd: timm built a ResNet for resnet10t.c3_in1k, not the DenseNet"):
        create_model('odd')


def test_recipe_add_a_backbone(registry):
    "Recipe: a new family is one Family record, a backbone one register_backbone line; create_model builds it."
    regnet = Family('regnet', timm.models.regnet.RegNet, gradcam_layer='final_conv', classifier_layer='head.fc')
    register_backbone('regnetx_002', 'regnetx_002.pycls_in1k', regnet)
    model = create_model('regnetx_002', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hook = gradcam_target_layer(model).register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.no_grad():
        logits, fmap = model(x), model.forward_features(x)
    hook.remove()
    assert model_family(model) == regnet and logits.shape == (2, 30)
    assert get_classifier(model) is model.head.fc and seen[0].shape == (2, model.num_features, 2, 2)
    torch.testing.assert_close(seen[0], fmap)
    reset_classifier(model, 'normed')
    assert isinstance(model.head.fc, NormedLinear)
    assert 'regnetx_002' not in BACKBONES   # the registry of every other test
