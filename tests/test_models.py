"""fintensor.models: every registered model scores windows, learns, and sees only its own window."""
from __future__ import annotations

import pytest
import torch

from fintensor.errors import BadInputError
from fintensor.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_scores_a_batch_and_trains_every_weight(name):
    torch.manual_seed(0)
    model = build_model(name, n_features=5, lookback=12, hidden=16, layers=2, dropout=0.1)
    x = torch.randn(7, 12, 5)
    out = model(x)
    assert out.shape == (7,) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.config["name"] == name
    rebuilt = build_model(**model.config)  # a checkpoint rebuilds a model from its config
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


@pytest.mark.parametrize("name", ["lstm", "gru", "alstm", "transformer", "tcn"])
def test_samples_are_scored_independently(name):
    """A sample's score depends on its own window only (no mixing across the batch)."""
    torch.manual_seed(1)
    model = build_model(name, n_features=3, lookback=8, hidden=8, layers=2).eval()
    x = torch.randn(4, 8, 3)
    full = model(x)
    alone = torch.stack([model(x[i:i + 1])[0] for i in range(4)])
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-6)


def test_tcn_is_causal_within_the_window():
    """Changing the oldest step changes the TCN's output only through its receptive field."""
    torch.manual_seed(2)
    model = build_model("tcn", n_features=2, lookback=16, hidden=8, layers=2, kernel_size=2).eval()
    x = torch.randn(1, 16, 2)
    y = x.clone()
    y[0, 0] += 10.0  # receptive field of 2 blocks (2 convs each), kernel 2, dilations 1, 2: 7 steps
    assert torch.equal(model(x), model(y))
    y[0, -3] += 10.0
    assert not torch.equal(model(x), model(y))


def test_bad_model_config():
    with pytest.raises(BadInputError, match="unknown model 'xgboost'; choose one of linear"):
        build_model("xgboost", 3, 5)
    with pytest.raises(BadInputError, match="multiple of heads"):
        build_model("transformer", 3, 5, hidden=10, heads=4)
    with pytest.raises(BadInputError, match="takes no option"):
        build_model("lstm", 3, 5, heads=2)
    with pytest.raises(BadInputError, match="lookback must be a positive integer"):
        build_model("gru", 3, 0)
