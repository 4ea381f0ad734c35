"""Every distillation loss against values computed by hand (plain Python math on small numbers)."""
import math

import pytest
import torch

from speedyrec.distill.losses import (TeacherProjections, candidate_cross_entropy, distillation_loss, embedding_loss,
                                      masked_mse, momentum_gradients, newsbert_hidden_loss, projected_mse,
                                      teacher_weights)
from speedyrec.engine.loss import autoregressive_loss, click_cross_entropy, target_scores


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def ce(logits):  # the positive is logits[0]
    return -math.log(softmax(logits)[0])


T1 = [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]]  # teacher 1: two samples, three candidates
T2 = [[0.0, 1.0, 0.0], [1.5, -0.5, 0.0]]  # teacher 2
S = [[1.0, 0.0, 0.5], [0.2, 0.2, -0.4]]  # student


def test_candidate_cross_entropy_by_hand():
    got = candidate_cross_entropy(torch.tensor(T1))
    assert got.tolist() == pytest.approx([ce(T1[0]), ce(T1[1])], rel=1e-6)
    assert click_cross_entropy(torch.tensor(T1)).tolist() == pytest.approx(got.tolist())


@pytest.mark.parametrize("omega", [1.0, 2.5])
def test_teacher_weights_by_hand_and_sum_to_one(omega):
    w = teacher_weights(torch.tensor([T1, T2]), omega)  # [T, M]
    for t in range(2):
        expect = softmax([-omega * ce(T1[t]), -omega * ce(T2[t])])
        assert w[t].tolist() == pytest.approx(expect, rel=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(2))


def test_teacher_weights_sum_to_one_for_random_teachers():
    torch.manual_seed(0)
    w = teacher_weights(torch.randn(4, 50, 10) * 5)
    assert torch.allclose(w.sum(-1), torch.ones(50), atol=1e-6) and (w >= 0).all()


def test_learned_omega_gets_a_gradient_and_teachers_none():
    t = torch.tensor([T1, T2], requires_grad=True)
    log_omega = torch.zeros((), requires_grad=True)
    w = teacher_weights(t, log_omega.exp())
    distillation_loss(torch.tensor(S), t, w, 1.0).sum().backward()
    assert log_omega.grad is not None and log_omega.grad != 0
    assert t.grad is None or not t.grad.any()  # teachers are constants


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_by_hand(temperature):
    w = teacher_weights(torch.tensor([T1, T2]))
    got = distillation_loss(torch.tensor(S), torch.tensor([T1, T2]), w, temperature)
    for t in range(2):
        a1, a2 = w[t].tolist()
        mixed = [(a1 * x + a2 * y) / temperature for x, y in zip(T1[t], T2[t])]
        p = softmax(mixed)
        q = softmax([s / temperature for s in S[t]])
        expect = temperature ** 2 * -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        assert got[t].item() == pytest.approx(expect, rel=1e-5)


def test_teacher_projections_equal_one_linear_layer_per_teacher():
    torch.manual_seed(0)
    proj = TeacherProjections(3, 5, 4)
    h = torch.randn(3, 2, 7, 5)
    out = proj(h)
    for i in range(3):
        assert torch.allclose(out[i], h[i] @ proj.weight[i].t() + proj.bias[i], atol=1e-6)


def test_projected_mse_and_embedding_loss_by_hand():
    proj = TeacherProjections(2, 2, 2)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]]))
        proj.bias.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    student = torch.tensor([[1.0, 2.0]])  # one sample
    teachers = torch.tensor([[[0.0, 2.0]], [[1.0, 5.0]]])  # [M=2, T=1, D=2]
    got = projected_mse(student, teachers, proj)  # teacher 1: (0,2) vs (1,2); teacher 2: (3,-1) vs (1,2)
    assert got[0].tolist() == pytest.approx([((0 - 1) ** 2 + 0) / 2, ((3 - 1) ** 2 + (-1 - 2) ** 2) / 2])
    w = torch.tensor([[0.25, 0.75]])
    assert embedding_loss(w, got, got * 2).item() == pytest.approx(0.25 * 0.5 * 3 + 0.75 * 6.5 * 3)


def test_masked_mse_and_newsbert_hidden_loss_by_hand():
    mask = torch.tensor([[True, True, False]])
    a = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    b = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    assert masked_mse(a, b, mask).item() == pytest.approx((1 + 0 + 0 + 4) / 4)  # padding ignored
    # student: embeddings + 2 layers; teacher: embeddings + 4 layers (K = 2): layer i <-> teacher layer 2i
    s = [a, a, b]
    t = [b, a * 0, b, a, b]
    got = newsbert_hidden_loss(s, t, mask)
    expect = masked_mse(a, b, mask) + masked_mse(a, b, mask) + masked_mse(b, b, mask)
    assert got.item() == pytest.approx(expect.item())


def test_momentum_gradients_by_hand():
    student = [torch.nn.Linear(2, 1, bias=False) for _ in range(2)]
    teacher = [torch.nn.Linear(2, 1, bias=False) for _ in range(4)]
    for i, layer in enumerate(student):
        layer.weight.grad = torch.full((1, 2), float(i + 1))
    for j, layer in enumerate(teacher):
        layer.weight.grad = torch.full((1, 2), 10.0 * (j + 1))
    momentum_gradients(student, teacher, beta=0.15)
    # student layer 0 <- teacher block (0, 1): mean 15; layer 1 <- (2, 3): mean 35
    assert student[0].weight.grad.flatten().tolist() == pytest.approx([0.85 * 1 + 0.15 * 15] * 2)
    assert student[1].weight.grad.flatten().tolist() == pytest.approx([0.85 * 2 + 0.15 * 35] * 2)


def test_target_scores_give_the_autoregressive_loss():
    torch.manual_seed(0)
    table = torch.randn(6, 4)
    clicks = torch.tensor([[0, 1, 2], [3, 4, -1]])
    negatives = torch.tensor([[[5], [0], [1]], [[2], [5], [-1]]])
    targets = clicks >= 0

    def prefix(x, m):  # a cumulative mean: the state after each prefix
        c = m.float().cumsum(1).clamp(min=1).unsqueeze(-1)
        return (x * m.unsqueeze(-1)).cumsum(1) / c

    empty = torch.zeros(4)
    sc = target_scores(table, clicks, negatives, targets, prefix, empty)
    loss, n = autoregressive_loss(table, clicks, negatives, targets, prefix, empty)
    assert n == 5 and sc.logits.shape == (5, 2)
    assert loss.item() == pytest.approx(click_cross_entropy(sc.logits).sum().item())
    # user 0's second target (click 1) is scored by the state after click 0, against news 0
    assert sc.logits[1].tolist() == pytest.approx([(table[0] @ table[1]).item(), (table[0] @ table[0]).item()], rel=1e-5)
    assert sc.logits[0].tolist() == pytest.approx([0.0, 0.0])  # the empty state scores 0


def test_projected_mse_without_projections_is_the_plain_mse_of_the_earlier_paper():
    from speedyrec.distill.losses import projected_mse

    torch.manual_seed(0)
    student, teachers = torch.randn(5, 3, 8), torch.randn(2, 5, 3, 8)
    want = torch.stack([((teachers[i] - student) ** 2).mean((1, 2)) for i in range(2)], dim=1)  # [T, M]
    torch.testing.assert_close(projected_mse(student, teachers, None), want)
