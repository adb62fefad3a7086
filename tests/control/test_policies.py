"""The categorical and Gaussian families against torch.distributions, and the networks' shapes."""

from __future__ import annotations

import pytest
import torch

from policygrad.control.policies import Categorical, Gaussian, Policy, ValueNet

B, O, A, D = 5, 3, 4, 2  # noqa: E741 (batch, observation, action, dimension)


@pytest.mark.exact
def test_categorical_matches_torch_distributions():
    torch.manual_seed(0)
    logits, old = torch.randn(B, A), torch.randn(B, A)
    actions = torch.randint(0, A, (B,))
    ref = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(Categorical.log_prob(logits, actions), ref.log_prob(actions))
    assert torch.allclose(Categorical.entropy(logits), ref.entropy())
    assert torch.allclose(
        Categorical.kl(old, logits), torch.distributions.kl_divergence(torch.distributions.Categorical(logits=old), ref)
    )
    assert Categorical.sample(logits).shape == (B,) and torch.equal(Categorical.mode(logits), logits.argmax(-1))


@pytest.mark.exact
def test_gaussian_matches_torch_distributions():
    torch.manual_seed(1)
    params, old = torch.randn(B, 2 * D), torch.randn(B, 2 * D)
    actions = torch.randn(B, D)

    def ref(p):
        return torch.distributions.Independent(torch.distributions.Normal(p[:, :D], p[:, D:].exp()), 1)

    assert torch.allclose(Gaussian.log_prob(params, actions), ref(params).log_prob(actions))
    assert torch.allclose(Gaussian.entropy(params), ref(params).entropy())
    assert torch.allclose(Gaussian.kl(old, params), torch.distributions.kl_divergence(ref(old), ref(params)))
    assert Gaussian.sample(params).shape == (B, D) and torch.equal(Gaussian.mode(params), params[:, :D])


@pytest.mark.property
def test_gaussian_samples_have_the_policy_spread():
    params = torch.tensor([[1.0, -2.0, 0.5, -1.0]]).expand(200_000, 4)  # mean (1, -2), std (e^0.5, e^-1)
    samples = Gaussian.sample(params, torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), torch.tensor([1.0, -2.0]), atol=0.02)
    assert torch.allclose(samples.std(0), torch.tensor([0.5, -1.0]).exp(), atol=0.02)


@pytest.mark.property
def test_networks_shapes_and_learnable_log_std():
    obs = torch.randn(B, O)
    assert Policy(O, A, (8, 8), "categorical")(obs).shape == (B, A)
    gaussian = Policy(O, D, (8,), "gaussian", log_std_init=-0.5)
    out = gaussian(obs)
    assert out.shape == (B, 2 * D) and torch.allclose(out[:, D:], torch.full((B, D), -0.5))
    assert any(p is gaussian.log_std for p in gaussian.parameters())  # trained with the rest
    assert ValueNet(O, (8,))(obs).shape == (B,)
