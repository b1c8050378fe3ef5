import pytest
import torch

from editr1.algorithms.flow_matching import flow_matching_loss


def test_flow_matching_loss_by_hand():
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    eps = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # targets ε − x0: [1, 1] and [0, −2]; errors [0, 1] and [0, 2] → means 0.5 and 2.0
    torch.testing.assert_close(flow_matching_loss(v, eps, x0), torch.tensor([0.5, 2.0]))


def test_flow_matching_loss_shape_error():
    with pytest.raises(ValueError):
        flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
