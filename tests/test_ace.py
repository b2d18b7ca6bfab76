"""ACE (cfbench.attacks.ace): the PGD against a float64 transcription of the reference loop,
the mask against scipy, the refinement keeps unmasked pixels exactly, a tiny ACE flips a tiny
classifier, determinism, error paths, and cf-at with generator=ace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfbench.attacks.ace import ACE, ACEParams, dilation_for, find_ddpm, refine, refinement_mask
from cfbench.errors import UsageError
from cfbench.models.ddpm import DDPM, DDPMParams

TINY_DDPM = DDPMParams(channels=(4, 8), norm_num_groups=4, attention=False, epochs=6, batch_size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A cnn8 (width 8) trained on digits, a tiny DDPM trained on the test split's second half,
    and 8 correctly classified test images with their runner-up classes."""
    from cfbench.attacks.ace import ddpm_path, ddpm_recipe, ddpm_split
    from cfbench.data.specs import Digits
    from cfbench.diffusion import train_ddpm
    from cfbench.models import build_model

    ds = Digits().load()
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    torch.manual_seed(0)
    clf = build_model("cnn8", ds.shape, 10, ds.mean, ds.std, {"width": 8})
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for _ in range(5):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(clf(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    cache = tmp_path_factory.mktemp("ace") / "_cache"
    recipe = ddpm_recipe(ds, TINY_DDPM, 0, "shift")
    path = ddpm_path(cache, recipe)
    ddpm, _ = train_ddpm(torch.from_numpy(ds.x_test[ddpm_split(ds)]), TINY_DDPM, recipe, path,
                         augmentation="shift", progress=False, checkpoint_seconds=1e9)
    xt, yt = torch.from_numpy(ds.x_test[:16]), torch.from_numpy(ds.y_test[:16])
    with torch.no_grad():
        logits = clf(xt)
    ok = logits.argmax(1) == yt
    xt, logits = xt[ok][:8], logits[ok][:8]
    return {"ds": ds, "clf": clf, "ddpm": ddpm, "path": path, "cache": cache, "x": xt,
            "t": logits.topk(2, 1).indices[:, 1], "c": logits.argmax(1)}


def test_dilation_scales_aces_kernel():
    assert dilation_for(128) == 15 and dilation_for(256) == 31
    assert dilation_for(8) == 1 and dilation_for(28) == 3 and dilation_for(32) == 3 and dilation_for(64) == 7


def test_mask_matches_an_independent_computation():
    from scipy.ndimage import maximum_filter

    g = torch.Generator().manual_seed(0)
    x, x_pe = torch.rand(3, 2, 9, 9, generator=g), torch.rand(3, 2, 9, 9, generator=g)
    x_pe[:, :, :4] = x[:, :, :4]     # some rows unchanged
    mask, keep = refinement_mask(x, x_pe, 3, 0.15)
    m = np.abs(x.numpy() - x_pe.numpy()).sum(1)
    m = m / m.reshape(3, -1).max(1)[:, None, None]
    dil = np.stack([maximum_filter(a, size=3, mode="constant", cval=-np.inf) for a in m])
    np.testing.assert_allclose(mask[:, 0].numpy(), m, rtol=1e-6)
    assert np.array_equal(keep[:, 0].numpy(), dil < 0.15)
    _, keep_same = refinement_mask(x, x.clone(), 3, 0.15)   # nothing changed: every pixel is kept
    assert keep_same.all()


def test_refinement_keeps_unmasked_pixels_exactly():
    torch.manual_seed(0)
    ddpm = DDPM((1, 8, 8), TINY_DDPM).eval()
    r = ddpm.respace(50)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    x_pe = x.clone()
    x_pe[:, :, 2:4, 3:6] = torch.rand(4, 1, 2, 3, generator=g)       # a patch changed by the attack
    _, keep = refinement_mask(x, x_pe, 1, 0.15)
    out = refine(ddpm, x, x_pe, keep, 5, r, lambda like: torch.randn(like.shape, generator=g), True)
    k = keep.expand_as(x)
    assert k.sum() > 0 and (~k).sum() > 0
    assert torch.equal(out[k], x[k])                                   # bit-exact outside the mask
    assert not torch.equal(out[~k], x[~k])                             # regenerated inside it
    assert out.min() >= 0 and out.max() <= 1


def _reference_pgd(model, x, t, *, iterations, step, lambda1):
    """The reference code's PGD (core/attacks_and_models.py, attack_joint=False), float64,
    per-example CE (summed) + lambda1 * L1, sign steps, eps = 1."""
    m = model.double()
    x0, adv = x.double(), x.double().clone()
    for _ in range(iterations):
        adv.requires_grad_(True)
        g1 = torch.autograd.grad(F.cross_entropy(m(adv), t, reduction="sum"), adv)[0]
        a2 = adv.detach().clone().requires_grad_(True)
        g2 = torch.autograd.grad(lambda1 * (x0 - a2).abs().sum(), a2)[0]
        adv = (adv.detach() - (g1 + g2).sign() * step).clamp(0, 1)
    model.float()
    return adv.float()


def test_plain_pgd_matches_the_reference_loop(tiny):
    p = ACEParams(filter=False, inpaint=0, iterations=12, lambda1=0.05)
    out = ACE(p).generate(tiny["clf"], tiny["x"], tiny["t"])
    ref = _reference_pgd(tiny["clf"], tiny["x"], tiny["t"], iterations=12, step=p.step, lambda1=0.05)
    # sign steps of 1/255 on the same path: equal up to a rare sign flip of a near-zero gradient
    assert (out.x - ref).abs().max() <= 2 * p.step + 1e-6
    assert ((out.x - ref).abs() > 1e-5).float().mean() < 0.02
    assert out.mask.sum() == ((out.x - tiny["x"]).abs().sum(1, keepdim=True) > 0).sum()


def test_tiny_ace_flips_a_tiny_classifier(tiny):
    # a tiny ACE: half the iterations at twice the step, no L1 term (a 6-epoch DDPM filters noisily)
    ace = ACE(ACEParams(iterations=25, step=2 / 255, lambda1=0.0, batch_size=8)).use(tiny["ddpm"])
    res = ace.generate(tiny["clf"], tiny["x"], tiny["t"])
    with torch.no_grad():
        pred = tiny["clf"](res.x).argmax(1)
    assert (pred == tiny["c"]).all() == False
    assert torch.equal(res.valid, pred == tiny["t"])
    assert res.valid.float().mean() >= 0.75             # the refined counterfactuals reach the target class
    assert res.valid_pe.float().mean() >= 0.5           # (the pre-explanation is optimised through F_tau)
    assert ((res.x - tiny["x"]).abs() > 0).any()
    again = ace.generate(tiny["clf"], tiny["x"], tiny["t"])
    assert torch.equal(res.x, again.x)                   # seeded per instance: reproducible
    other = ACE(ACEParams(iterations=3, batch_size=8, seed=1)).use(tiny["ddpm"]).generate(
        tiny["clf"], tiny["x"], tiny["t"])
    short = ACE(ACEParams(iterations=3, batch_size=8)).use(tiny["ddpm"]).generate(tiny["clf"], tiny["x"], tiny["t"])
    assert not torch.equal(short.x_pe, other.x_pe)        # the seed drives the filter's noise
    # the L1 term buys proximity (plain PGD: the same optimiser without the filter)
    far = ACE(ACEParams(lambda1=0.0, filter=False, inpaint=0)).generate(tiny["clf"], tiny["x"], tiny["t"])
    near = ACE(ACEParams(lambda1=0.2, filter=False, inpaint=0)).generate(tiny["clf"], tiny["x"], tiny["t"])
    l1 = lambda r: float((r.x - tiny["x"]).abs().sum())
    assert l1(near) < l1(far)


def test_errors_name_the_bad_value(tiny):
    with pytest.raises(UsageError, match="ace.dilation=4 must be odd"):
        ACEParams(dilation=4)
    with pytest.raises(UsageError, match="out of range"):
        ACEParams(tau=1.5)
    with pytest.raises(UsageError, match="no DDPM loaded"):
        ACE().generate(tiny["clf"], tiny["x"], tiny["t"])
    with pytest.raises(UsageError, match="8 instances but 3 target classes"):
        ACE(ACEParams(filter=False, inpaint=0)).generate(tiny["clf"], tiny["x"], tiny["t"][:3])
    with pytest.raises(UsageError, match=r"cfbench ddpm train --dataset digits.*or set ace.ddpm=<file>"):
        find_ddpm("default", tiny["ds"], tiny["cache"] / "elsewhere", "shift")
    with pytest.raises(UsageError, match=r"or set counterfactual.ace_ddpm=<file>"):
        find_ddpm("default", tiny["ds"], tiny["cache"] / "elsewhere", "shift", setting="counterfactual.ace_ddpm")
    with pytest.raises(UsageError) as e:   # a caller with no such key (cf-at) offers no key to set
        find_ddpm("default", tiny["ds"], tiny["cache"] / "elsewhere", "shift", setting=None)
    assert "or set" not in str(e.value) and "resumable)." in str(e.value)
    model, meta = find_ddpm(str(tiny["path"]), tiny["ds"], None, "shift")
    assert meta["recipe"]["split"] == "test-second-half" and model.params == TINY_DDPM


@pytest.mark.slow
def test_cf_at_with_ace_counterfactuals(tiny, tmp_path):
    """cf-at generator=ace through a tiny run: the DDPM is found in the run's cache."""
    import shutil

    from cfbench.attacks.ace import ddpm_path, ddpm_recipe
    from cfbench.registry import get
    from cfbench.testing.tiny import fit_context, tiny_config, tiny_data
    from cfbench.training.recipe import build_model_for

    cfg = tiny_config("cf-at", sets={"defense.generator": "ace", "defense.steps": 2, "defense.c_steps": 1,
                                     "defense.ae_epochs": 1, "data.pool_size": 64})
    data = tiny_data(cfg)
    # the default recipe's file name, holding the tiny DDPM (the default one takes minutes to train)
    target = ddpm_path(tmp_path / "_cache", ddpm_recipe(data.dataset, DDPMParams(), 0, "shift"))
    target.parent.mkdir(parents=True)
    shutil.copy(tiny["path"], target)
    cls = get("defense", "cf-at")
    model = build_model_for(cfg, data, 0)
    ctx = fit_context(cfg, data, root=tmp_path)
    cls(cfg.defense_params).fit(model, data.x_train, data.y_train, ctx)
    assert ctx.notes["counterfactuals"]["choices"]["generator"] == "ace"
    assert ctx.notes["counterfactuals"]["generation_recipe"]["counterfactual_generator"] == "ace"
    assert ctx.metrics["cf.flip_rate"]["n"] == len(data.x_train)
    assert ctx.metrics["cf.replaced"] > 0


@pytest.mark.slow
def test_ace_counterfactuals_as_an_inversion_explanation(tiny, tmp_path):
    """inversion.explanations=ace_counterfactual: the attacker sees ACE counterfactuals."""
    import shutil

    from cfbench import params as P
    from cfbench.attacks.ace import ddpm_path, ddpm_recipe
    from cfbench.registry import get
    from cfbench.testing.tiny import eval_context, fit_context, tiny_config, tiny_data
    from cfbench.training.recipe import build_model_for

    cfg = tiny_config("erm", sets={"data.pool_size": 96, "data.test_size": 32})
    data = tiny_data(cfg)
    target = ddpm_path(tmp_path / "_cache", ddpm_recipe(data.dataset, DDPMParams(), 0, "shift"))
    target.parent.mkdir(parents=True)
    shutil.copy(tiny["path"], target)
    model = build_model_for(cfg, data, 0)
    get("defense", "erm")().fit(model, data.x_train, data.y_train, fit_context(cfg, data))
    model.eval()
    cls = get("evaluator", "inversion")
    ev = cls(P.build(cls.Params, {"explanations": "ace_counterfactual", "architectures": "flatten",
                                  "max_epochs": "2", "attention_transfer": "false", "classifier_epochs": "1",
                                  "max_eval": "8", "n_examples": "0"}, where="inversion."))
    res = ev.evaluate(eval_context(cfg, model, tmp_path, data))
    assert any(k.startswith("inversion.ace_counterfactual.flatten.members.") for k in res.metrics)

    def find(d):   # the evaluator's notes nest the explainer's record
        if isinstance(d, dict):
            if "ace_counterfactual" in d and isinstance(d["ace_counterfactual"], dict):
                return d["ace_counterfactual"]
            return next((f for f in map(find, d.values()) if f is not None), None)
        return None

    note = find(res.notes)
    assert note is not None and note["n"] > 0 and "ace" in note["explainer"]
