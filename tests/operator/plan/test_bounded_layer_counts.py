"""Sliding-window and chunked-attention layers are different layers of one model: together they are at
most numLayers. Each alone was checked, the sum was not, so slidingWindowLayers 40 on Llama 4 Scout (36
chunked layers by its architecture's default, 48 in all) planned as a negative count of full layers:
"holds -6093403 tokens ... set engine.maxModelLen <= -3203536". The facts come from the catalog,
spec.model.config, or (kubemoe up) the checkpoint's config.json; all meet in resolve_model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.spec import ModelSpec
from kubemoe_operator.catalog import Catalog, load_catalog, resolve_model
from kubemoe_operator.local.model import facts_from_config_json
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import REPO
from tests.operator.plan.test_chunked_attention import SCOUT, SCOUT_CONFIG_JSON

CATALOG = load_catalog()


def _refused(config: dict[str, Any], *, name: str = SCOUT) -> Problem:
    spec = ModelSpec(name=name, source="hf://org/model", config=ModelConfig.model_validate(config))
    with pytest.raises(ManifestError) as err:
        resolve_model(spec, CATALOG)
    (problem,) = err.value.problems
    return problem


def test_sliding_layers_on_top_of_llama4s_default_chunked_layers_are_refused_naming_both() -> None:
    problem = _refused({"slidingWindow": 4096, "slidingWindowLayers": 40})
    assert problem.field == "spec.model.config.slidingWindowLayers"
    assert "slidingWindowLayers 40 + chunkedAttentionLayers 36" in problem.message
    assert "numLayers 48" in problem.message
    assert "default" in problem.message  # the 36 is the architecture's, not the spec's
    assert "layer_types" in problem.fix
    assert "no_rope_layers" in problem.fix


def test_chunked_layers_given_on_a_sliding_window_model_are_refused() -> None:
    problem = _refused({"attentionChunkSize": 8192, "chunkedAttentionLayers": 30}, name="openai/gpt-oss-120b")
    assert "slidingWindowLayers 18 + chunkedAttentionLayers 30 = 48" in problem.message
    assert "numLayers 36" in problem.message
    assert "default" not in problem.message


def test_a_checkpoints_config_json_is_checked_alike() -> None:
    cfg = copy.deepcopy(SCOUT_CONFIG_JSON)
    cfg["text_config"] |= {
        "layer_types": ["sliding_attention"] * 20 + ["full_attention"] * 28,
        "sliding_window": 4,
    }
    config = ModelConfig.model_validate(facts_from_config_json(cfg))
    no_models = Catalog(models=(), gpus=CATALOG.gpus)
    with pytest.raises(ManifestError, match="slidingWindowLayers 20 \\+ chunkedAttentionLayers 36"):
        resolve_model(ModelSpec(name="m", source="file:///m", config=config), no_models)


@pytest.mark.parametrize(("sliding", "chunked"), [(12, 36), (24, 24), (0, 48), (48, 0)])
def test_up_to_num_layers_together_resolve(sliding: int, chunked: int) -> None:
    config = {"slidingWindow": 4096, "slidingWindowLayers": sliding, "chunkedAttentionLayers": chunked}
    model = resolve_model(
        ModelSpec(name=SCOUT, source="hf://o/m", config=ModelConfig.model_validate(config)), CATALOG
    )
    assert (model.sliding_window_layers, model.chunked_layers) == (sliding, chunked)


def test_the_reproduced_manifest_is_refused_before_sizing() -> None:
    data = yaml.safe_load((REPO / "examples" / "llama-4-scout.yaml").read_text())
    data["spec"]["model"]["config"] = {"slidingWindow": 4096, "slidingWindowLayers": 40}
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(data))
    assert [p.field for p in err.value.problems] == ["spec.model.config.slidingWindowLayers"]
    assert "maxModelLen" not in str(err.value)
