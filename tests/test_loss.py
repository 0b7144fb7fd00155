"""ContrastiveLoss: InfoNCE / SigLIP against open_clip and naive references, false negatives, and exactness of
local loss + gather-with-grad across 2 gloo processes (DDP) against one process on the same global batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from radalign.pretrain.loss import ContrastiveLoss

from radalign import RadalignError

NANO = Path(__file__).parent / "assets" / "nano.json"


def _features(n: int, d: int = 16, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return img, txt


def _naive_infonce(img, txt, scale: float, study, text) -> float:
    """Double loop in Python floats: soft-target cross-entropy, uniform over each row's positives."""
    n = len(img)
    a, b = img.tolist(), txt.tolist()
    total = 0.0
    for rows, cols in ((a, b), (b, a)):  # image->text, then text->image
        for i in range(n):
            logits = [scale * sum(x * y for x, y in zip(rows[i], cols[j])) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            positives = [j for j in range(n) if j == i or (study[i] >= 0 and study[i] == study[j])
                         or (text[i] >= 0 and text[i] == text[j])]
            total += -sum(logits[j] - log_z for j in positives) / len(positives)
    return total / (2 * n)


def _naive_siglip(img, txt, scale: float, bias: float, study, text) -> float:
    n = len(img)
    a, b = img.tolist(), txt.tolist()
    total = 0.0
    for i in range(n):
        for j in range(n):
            pos = i == j or (study[i] >= 0 and study[i] == study[j]) or (text[i] >= 0 and text[i] == text[j])
            z = scale * sum(x * y for x, y in zip(a[i], b[j])) + bias
            total += math.log1p(math.exp(-z if pos else z))  # -log sigmoid(label * z)
    return total / n


def _dup_ids(n: int):
    study = torch.arange(n) * 7 + 1000
    text = torch.arange(n) * 13 + 5000
    study[5] = study[2]  # two images of one study
    text[9] = text[1]  # identical normalised reports
    text[10] = text[1]
    study[3] = study[4] = -1  # unknown study ids never match each other
    return study, text


# ----------------------------------------------------------------------------------------------------------
# One process


def test_without_duplicates_false_negative_loss_is_exactly_infonce_and_equals_open_clip():
    img, txt = _features(12)
    scale = torch.tensor([20.0], dtype=torch.float64)
    ids = torch.arange(12), torch.arange(12) + 100
    fn = ContrastiveLoss(false_negatives=True)(img, txt, scale, *ids)
    g_fn = torch.autograd.grad(fn, (img, txt))
    plain = ContrastiveLoss(false_negatives=False)(img, txt, scale, *ids)
    g_plain = torch.autograd.grad(plain, (img, txt))
    ref = ClipLoss()(img, txt, scale.reshape(()))
    assert torch.equal(fn, plain)  # one-hot soft targets reduce to the index targets, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(g_fn, g_plain))
    assert fn.item() == pytest.approx(ref.item(), abs=1e-12)


def test_duplicates_match_naive_soft_target_reference():
    img, txt = _features(12, seed=1)
    study, text = _dup_ids(12)
    loss = ContrastiveLoss()(img, txt, torch.tensor(10.0, dtype=torch.float64), study, text)
    assert loss.item() == pytest.approx(_naive_infonce(img, txt, 10.0, study.tolist(), text.tolist()), abs=1e-10)
    plain = ContrastiveLoss(false_negatives=False)(img, txt, torch.tensor(10.0, dtype=torch.float64), study, text)
    assert abs(loss.item() - plain.item()) > 1e-3  # the duplicates do change the targets


def test_only_study_or_only_text_ids():
    img, txt = _features(12, seed=2)
    study, text = _dup_ids(12)
    scale = torch.tensor(5.0, dtype=torch.float64)
    unique = list(range(-12, 0))  # negative: never matches
    by_study = ContrastiveLoss()(img, txt, scale, study_id=study)
    assert by_study.item() == pytest.approx(_naive_infonce(img, txt, 5.0, study.tolist(), unique), abs=1e-10)
    by_text = ContrastiveLoss()(img, txt, scale, text_id=text)
    assert by_text.item() == pytest.approx(_naive_infonce(img, txt, 5.0, unique, text.tolist()), abs=1e-10)


def test_logit_scale_is_clamped_functionally_not_in_place():
    img, txt = _features(6, seed=3)
    log_scale = torch.tensor([math.log(500.0)], dtype=torch.float64, requires_grad=True)
    before = log_scale.detach().clone()
    loss = ContrastiveLoss(false_negatives=False)(img, txt, log_scale.exp())
    loss.backward()
    at_cap = ContrastiveLoss(false_negatives=False)(img, txt, torch.tensor(100.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(at_cap.item(), abs=1e-12)
    assert torch.equal(log_scale.detach(), before)  # parameter untouched
    assert log_scale.grad.abs().item() == 0.0  # above the cap the scale gets no gradient
    below = torch.tensor([math.log(20.0)], dtype=torch.float64, requires_grad=True)
    ContrastiveLoss(false_negatives=False)(img, txt, below.exp()).backward()
    assert below.grad.abs().item() > 0


def test_siglip_matches_open_clip_and_naive_reference():
    img, txt = _features(12, seed=4)
    scale, bias = torch.tensor([10.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64)
    ref = SigLipLoss()(img, txt, scale.reshape(()), bias.reshape(()))
    off = ContrastiveLoss(kind="siglip", false_negatives=False)(img, txt, scale, logit_bias=bias)
    no_dups = ContrastiveLoss(kind="siglip")(img, txt, scale, torch.arange(12), torch.arange(12), logit_bias=bias)
    assert off.item() == pytest.approx(ref.item(), abs=1e-10)
    assert no_dups.item() == pytest.approx(ref.item(), abs=1e-10)
    study, text = _dup_ids(12)
    dups = ContrastiveLoss(kind="siglip")(img, txt, scale, study, text, logit_bias=bias)
    assert dups.item() == pytest.approx(_naive_siglip(img, txt, 10.0, -10.0, study.tolist(), text.tolist()),
                                        abs=1e-9)


def test_user_errors_are_clear():
    img, txt = _features(4)
    with pytest.raises(RadalignError, match="init_logit_bias"):
        ContrastiveLoss(kind="siglip")(img, txt, torch.tensor(10.0))
    with pytest.raises(RadalignError, match="infonce, siglip"):
        ContrastiveLoss(kind="clip")
    with pytest.raises(RadalignError, match="rank=2"):
        ContrastiveLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        ContrastiveLoss()(img, txt[:3], torch.tensor(10.0))
    with pytest.raises(ValueError, match="study_id"):
        ContrastiveLoss()(img, txt, torch.tensor(10.0), study_id=torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Two gloo processes (DDP) == one process on the same 64 pairs


WORLD, PER_RANK = 2, 32
CASES = ("fn", "plain", "siglip_fn", "siglip_plain", "no_gather_grad")


def _batch():
    n = WORLD * PER_RANK
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, 64, 64, generator=g)
    tokens = torch.randint(1, 49406, (n, 32), generator=g)
    eot = torch.randint(4, 32, (n,), generator=g)
    tokens[torch.arange(n), eot] = 49407  # open_clip pools at the end-of-text token (argmax id)
    study = torch.arange(n) + 10
    text = torch.arange(n) + 1000
    study[40] = study[3]  # duplicates across the two ranks ...
    text[50] = text[60] = text[5]
    study[10] = study[11]  # ... and within one
    return images, tokens, study, text


def _model(kind: str):
    from radalign.pretrain.models import build_model, get_model_config

    cfg = get_model_config(str(NANO))
    if kind == "siglip":
        cfg["init_logit_bias"] = -10.0
    torch.manual_seed(0)
    return build_model(cfg)  # a ViT tower: no BatchNorm, so DDP sharding is exact


def _loss(case: str, model_out: dict, rank: int, world: int, study, text):
    img, txt, scale = model_out["image_features"], model_out["text_features"], model_out["logit_scale"]
    if case == "no_gather_grad":  # open_clip without gather-with-grad: the negative control
        return ClipLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=world)(img, txt, scale)
    kind = "siglip" if case.startswith("siglip") else "infonce"
    loss_fn = ContrastiveLoss(rank=rank, world_size=world, false_negatives=case.endswith("fn"), kind=kind)
    return loss_fn(img, txt, scale, study, text, logit_bias=model_out.get("logit_bias"))


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _ddp_worker(rank: int, init_file: str, out_file: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images, tokens, study, text = _batch()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        result = {}
        models = {kind: _model(kind) for kind in ("clip", "siglip")}  # built once, from the same seed
        wrapped = {kind: DDP(m) for kind, m in models.items()}
        for case in CASES:
            kind = "siglip" if case.startswith("siglip") else "clip"
            out = wrapped[kind](images[part], tokens[part])
            loss = _loss(case, out, rank, WORLD, study[part], text[part])
            loss.backward()  # DDP averages the gradients over the 2 ranks
            result[case] = _grads(models[kind])
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def _single_process_grads() -> dict[str, dict[str, torch.Tensor]]:
    images, tokens, study, text = _batch()
    models = {kind: _model(kind) for kind in ("clip", "siglip")}
    result = {}
    for case in CASES:
        model = models["siglip" if case.startswith("siglip") else "clip"]
        reference_case = "plain" if case == "no_gather_grad" else case
        _loss(reference_case, model(images, tokens), 0, 1, study, text).backward()
        result[case] = _grads(model)
    return result


def test_two_processes_of_32_equal_one_process_of_64(tmp_path):
    import torch.multiprocessing as mp

    out_file = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    ddp = torch.load(out_file, weights_only=True)
    singles = _single_process_grads()
    for case in CASES:
        single = singles[case]
        diff = max((ddp[case][n] - g).abs().max().item() for n, g in single.items())
        scale = max(g.abs().max().item() for g in single.values())
        if case == "no_gather_grad":  # without gather-with-grad the encoder gradients are wrong
            assert diff > 0.1 * scale, (case, diff, scale)
        else:
            assert diff < 1e-5, (case, diff)
            assert scale > 1e-3  # and the gradients are not trivially zero
