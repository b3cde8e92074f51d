"""out_features / out_indices resolution, checked against transformers' own BackboneConfigMixin."""

from __future__ import annotations

import itertools

import pytest
import transformers
from helpers import ALL_STAGES, TINY_BASIC

from resnet_backbone import ResNetBackbone, ResNetConfig
from resnet_backbone.adapter_api import align_out_features

NUM_STAGES = len(ALL_STAGES)


def transformers_alignment(out_features=None, out_indices=None) -> tuple[list[str], list[int]]:
    config = transformers.ResNetConfig(out_features=out_features, out_indices=out_indices)
    return config.out_features, [i % NUM_STAGES for i in config.out_indices]


def every_stage_subset() -> list[list[int]]:
    """Every subset of stages, in order, with each index written as positive and as negative (3^5 lists)."""
    choices = [(None, i, i - NUM_STAGES) for i in range(NUM_STAGES)]
    return [[i for i in chosen if i is not None] for chosen in itertools.product(*choices)]


def test_every_subset_by_index_aligns_as_transformers():
    for out_indices in every_stage_subset():
        assert align_out_features(ALL_STAGES, None, out_indices) == transformers_alignment(out_indices=out_indices)


def test_every_subset_by_name_or_both_aligns_as_transformers():
    for out_indices in every_stage_subset():
        names = [ALL_STAGES[i] for i in out_indices]
        expected = transformers_alignment(out_features=names)
        assert align_out_features(ALL_STAGES, names, None) == expected
        assert align_out_features(ALL_STAGES, tuple(names), tuple(out_indices)) == expected
        assert expected == transformers_alignment(out_features=names, out_indices=out_indices)


# Property tests, in the full suite: hypothesis is imported inside them, as collecting it costs each test
# process 2 s.
@pytest.mark.slow
def test_arbitrary_indices_are_aligned_as_transformers_or_rejected_with_value_error():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(st.integers(-8, 8), max_size=6))
    def check(out_indices: list[int]) -> None:
        try:
            expected = transformers_alignment(out_indices=out_indices)
        except (ValueError, IndexError):  # transformers lets some bad indices through to an IndexError
            with pytest.raises(ValueError, match="stage_names"):
                align_out_features(ALL_STAGES, None, out_indices)
        else:
            assert align_out_features(ALL_STAGES, None, out_indices) == expected

    check()


@pytest.mark.slow
def test_arbitrary_names_are_aligned_as_transformers_or_rejected_with_value_error():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from([*ALL_STAGES, "stage5", "Stage1", "layer1"]), max_size=6))
    def check(out_features: list[str]) -> None:
        try:
            expected = transformers_alignment(out_features=out_features)
        except ValueError:
            with pytest.raises(ValueError, match="stage_names"):
                align_out_features(ALL_STAGES, out_features, None)
        else:
            assert align_out_features(ALL_STAGES, out_features, None) == expected

    check()


def test_nothing_selected_means_the_last_stage():
    assert align_out_features(ALL_STAGES) == (["stage4"], [4]) == transformers_alignment()


@pytest.mark.parametrize(
    ("out_features", "out_indices", "message"),
    [
        (["stage5"], None, "unknown stage 'stage5'. Did you mean 'stage4'"),
        (["steam"], None, "Did you mean 'stem'"),
        (None, [5], "out of range"),
        (None, [-6], "out of range"),  # transformers: IndexError
        (None, [-7], "out of range"),  # transformers: IndexError
        (None, [4, -1], "more than once"),
        (["stage1", "stage1"], None, "more than once"),
        (None, [3, 1], r"expected \[1, 3\]"),
        (["stage3", "stage1"], None, r"expected \['stage1', 'stage3'\]"),
        (["stage1"], [2], "name different stages"),
        (["stage1", "stage2"], [1], "name different stages"),
        ("stage2", None, r"Did you mean \['stage2'\]"),
        ([2], None, "must contain stage names"),
        (None, ["stage2"], "must contain integers"),
        (None, [True], "must contain integers"),
        (None, [1.0], "must contain integers"),
        (None, 2, "must be a list"),
        ({"stage1"}, None, "must be a list"),
    ],
)
def test_bad_selections_are_value_errors_that_list_the_stage_names(out_features, out_indices, message):
    with pytest.raises(ValueError, match=message) as error:
        align_out_features(ALL_STAGES, out_features, out_indices)
    assert str(ALL_STAGES) in str(error.value)


def test_the_config_resolves_with_the_same_function_and_realigns_when_set():
    config = ResNetConfig(out_indices=(-3, -1))
    assert (config.out_features, config.out_indices) == (["stage2", "stage4"], [2, 4])
    config.out_features = ["stem", "stage1"]
    assert config.out_indices == [0, 1]
    config.out_indices = [3]
    assert config.out_features == ["stage3"]
    with pytest.raises(ValueError, match="stage_names"):
        config.out_features = ["stage9"]
    with pytest.raises(ValueError, match="name different stages"):
        ResNetConfig(out_features=["stage1"], out_indices=[2])


def test_setting_the_selection_on_the_backbone_realigns_both_and_changes_the_outputs(images):
    backbone = ResNetBackbone(**TINY_BASIC, out_features=["stage1", "stage3"]).eval()
    backbone.out_indices = [-2]
    assert (backbone.out_features, backbone.out_indices) == (["stage3"], [3])
    assert backbone.config.out_features == ["stage3"]
    assert [f.shape[1] for f in backbone(images).feature_maps] == backbone.channels == [64]
    backbone.out_features = ["stem", "stage2"]
    assert backbone.out_indices == [0, 2]
    assert [f.shape[1] for f in backbone(images).feature_maps] == backbone.channels == [32, 48]


def test_an_empty_selection_is_accepted_as_transformers_accepts_it(images):
    assert align_out_features(ALL_STAGES, []) == ([], []) == transformers_alignment(out_features=[])
    backbone = ResNetBackbone(**TINY_BASIC, out_features=[])
    assert len(backbone.encoder.stages) == 0
    assert backbone(images).feature_maps == ()
