"""ResNetModel and ResNetForImageClassification against transformers' own models."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import TINY_BASIC, TINY_BOTTLENECK, max_abs_diff, randomize_norms

from resnet_backbone import ResNetConfig, ResNetForImageClassification, ResNetModel


def _pair(ours_class, theirs_class, **config_fields):
    theirs = randomize_norms(theirs_class(transformers.ResNetConfig(**config_fields)).eval())
    ours = ours_class(ResNetConfig(**config_fields)).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("fields", [TINY_BOTTLENECK, TINY_BASIC], ids=["bottleneck", "basic"])
def test_resnet_model_outputs_equal_transformers(fields, images):
    theirs, ours = _pair(ResNetModel, transformers.ResNetModel, **fields)
    with torch.no_grad():
        expected, actual = theirs(images, output_hidden_states=True), ours(images, output_hidden_states=True)
        assert len(ours(images, return_dict=False)) == len(theirs(images, return_dict=False)) == 2
    assert max_abs_diff(actual.last_hidden_state, expected.last_hidden_state) <= 1e-5
    assert max_abs_diff(actual.pooler_output, expected.pooler_output) <= 1e-5
    assert len(actual.hidden_states) == len(expected.hidden_states) == 5
    for mine, reference in zip(actual.hidden_states, expected.hidden_states):
        assert max_abs_diff(mine, reference) <= 1e-5


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "labels"),
    [
        (3, None, torch.tensor([2, 0])),
        (3, None, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        (1, None, torch.tensor([0.5, -1.5])),
        (3, "regression", torch.tensor([[0.5, 1.0, 0.0], [1.0, -2.0, 3.0]])),
        (3, "single_label_classification", torch.tensor([1, -100])),
    ],
    ids=["single-label", "multi-label", "regression-1", "regression-3", "ignore-index"],
)
def test_classifier_logits_and_loss_equal_transformers(num_labels, problem_type, labels, images):
    fields = dict(TINY_BASIC, num_labels=num_labels, problem_type=problem_type)
    theirs, ours = _pair(ResNetForImageClassification, transformers.ResNetForImageClassification, **fields)
    assert (
        "classifier.1.weight" in ours.state_dict()
        and "resnet.embedder.embedder.convolution.weight" in ours.state_dict()
    )
    with torch.no_grad():
        expected, actual = theirs(images, labels=labels), ours(images, labels=labels)
        mine_tuple = ours(images, labels=labels, return_dict=False)
    assert max_abs_diff(actual.logits, expected.logits) <= 1e-5
    assert max_abs_diff(actual.loss, expected.loss) <= 1e-5
    assert len(mine_tuple) == 2 and torch.equal(mine_tuple[0], actual.loss)


def test_labels_metadata_and_headless_classifier_follow_transformers(images):
    id2label = {0: "cat", 1: "dog"}
    model = ResNetForImageClassification(**TINY_BASIC, id2label=id2label)
    assert (model.num_labels, model.config.label2id) == (2, {"cat": 0, "dog": 1})
    headless = ResNetForImageClassification(**TINY_BASIC, num_labels=0)
    theirs = transformers.ResNetForImageClassification(transformers.ResNetConfig(**TINY_BASIC, num_labels=0))
    assert headless(images).logits.shape == theirs(images).logits.shape == (2, 96)


def test_classifier_honours_freeze_at_through_the_inner_model(images):
    model = ResNetForImageClassification(**TINY_BOTTLENECK, freeze_at=1, num_labels=4).train()
    assert not any(p.requires_grad for p in model.resnet.embedder.parameters())
    assert not model.resnet.embedder.embedder.normalization.training
    model(images, labels=torch.tensor([1, 3])).loss.backward()
    assert model.classifier[1].weight.grad is not None
