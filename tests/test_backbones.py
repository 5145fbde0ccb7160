"""The GPT and Llama backbones and the HSTU ablations behind the one SequentialRecommender interface: causal,
trainable, saved and loaded exactly, positions where each puts them, and the published HSTU left as it was."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from infra.settings import ScalingSettings
from models.data import NUM_EVENT_TYPES, ItemVocab, batch_from_histories
from models.hstu import HSTU, bucketize_time_gap
from models.llama import apply_rotary, rotary_angles, swiglu_width
from models.recipe import BASE_RECIPE, resolve_recipe
from models.recommender import PUBLISHED_HSTU, ModelConfig, Recommender, SequentialRecommender, build_model
from models.train import train
from tests.test_models import T0_MS, synthetic_events

# name -> the recipe keys that make it (everything else from base.yaml)
VARIANTS = {
    "gpt": {"model": "gpt"},
    "llama": {"model": "llama"},
    "hstu-no-rab": {"model": "hstu", "hstu_rab": False},
    "hstu-softmax": {"model": "hstu", "hstu_attention": "softmax"},
    "hstu-no-gating": {"model": "hstu", "hstu_gating": False},
}
ITEMS = 20
SIZES = {"max_len": 12, "dim": 16, "blocks": 2, "heads": 2}


def model_config(**keys: object) -> ModelConfig:
    """base.yaml's model, small, with ``keys`` changed."""
    return resolve_recipe(BASE_RECIPE, **{**SIZES, "dropout": 0.0, **keys}).model_config(ITEMS)


def tiny(seed: int = 0, **keys: object) -> SequentialRecommender:
    torch.manual_seed(seed)
    return build_model(model_config(**keys)).eval()


def batch(items: list[list[int]]):
    """Histories of dense item ids as one jagged batch: listens a minute apart, the request a minute later."""
    times = [T0_MS // 1000 + 60 * np.arange(len(x)) for x in items]
    return batch_from_histories([np.asarray(x) for x in items], [np.ones(len(x), np.int64) for x in items],
                                times, [int(t[-1]) + 60 for t in times])


def encode(model: SequentialRecommender, items: list[list[int]]) -> torch.Tensor:
    b = batch(items)
    with torch.no_grad():
        return model(b.features, b.timestamps, b.query_timestamps)  # [N, D]


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return synthetic_events(users=30, items=ITEMS, length=15)


# ----------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("name", [*VARIANTS, "hstu", "sasrec"])
def test_a_later_event_never_changes_an_earlier_output(name: str) -> None:
    model = tiny(**VARIANTS.get(name, {"model": name}))
    seq, other = [3, 7, 1, 9, 4, 12, 5, 2], [8, 8, 2]
    base = encode(model, [seq, other])  # [11, D]
    changed = encode(model, [seq[:5] + [15] + seq[6:], other])  # the 6th event replaced
    torch.testing.assert_close(changed[:5], base[:5], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[5:8], base[5:8], atol=1e-3)  # from the 6th on, it shows
    torch.testing.assert_close(changed[8:], base[8:], rtol=0, atol=1e-6)  # the other sequence: untouched
    # a prefix alone (a shorter batch, other padding) gives the same states as inside the whole sequence
    prefix = encode(model, [seq[:4], other])
    torch.testing.assert_close(prefix[:4], base[:4], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_lowers_the_loss_and_the_saved_model_scores_the_same(name: str, events: pd.DataFrame,
                                                                      tmp_path: Path) -> None:
    cfg = resolve_recipe(BASE_RECIPE, **SIZES, **VARIANTS[name], negatives=8, batch_size=16, epochs=3, patience=0)
    result = train(events, cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert all(math.isfinite(v) for v in result.test_metrics.values()) and result.test_metrics["ndcg@10"] > 0
    # save / load through the serving wrapper: same config, same weights, the same scores
    rec = result.recommender()
    loaded = Recommender.load(rec.save(tmp_path / name))
    assert loaded.config == rec.config and loaded.config.model == VARIANTS[name]["model"]
    histories = [{"item_ids": [100 + i for i in range(k, k + 6)],
                  "timestamps_ms": [T0_MS + 60_000 * i for i in range(6)]} for k in range(4)]
    assert loaded.recommend(histories, k=5) == rec.recommend(histories, k=5)


# ----------------------------------------------------------------------------------------------------- positions


def test_llama_has_no_position_table_and_reads_the_bare_tokens() -> None:
    def encoder_input(model: SequentialRecommender, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        hook = model.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        b = batch([items])
        with torch.no_grad():
            model(b.features, b.timestamps, b.query_timestamps)
            emb = model.embeddings(b.features)
        hook.remove()
        d = model.cfg.dim
        return seen[0], math.sqrt(d) * (emb["item_id"].values()[:, :d] + emb["event_type"].values()[:, :d])

    llama, gpt = tiny(model="llama"), tiny(model="gpt")
    assert llama.pos_emb is None and not [k for k in llama.state_dict() if k.startswith("pos_emb")]
    assert not llama.cfg.learned_positions and gpt.cfg.learned_positions
    x, tokens = encoder_input(llama, [3, 3, 3, 5])
    assert torch.equal(x, tokens)  # nothing added: the repeated item gives the same input at every position
    x, tokens = encoder_input(gpt, [3, 3, 3, 5])  # the control: GPT's inputs carry learned positions
    torch.testing.assert_close(x - tokens, gpt.pos_emb.weight[:4], rtol=0, atol=1e-6)


def test_rotary_attention_sees_relative_positions_and_only_they_order_one_block() -> None:
    n, d, shift = 6, 8, 5
    q, k = torch.randn(n, d), torch.randn(n, d)
    cos, sin = rotary_angles(n + shift, d, torch.device("cpu"))
    scores = apply_rotary(q, cos[:n], sin[:n]) @ apply_rotary(k, cos[:n], sin[:n]).T  # positions 0..n-1
    shifted = apply_rotary(q, cos[shift:], sin[shift:]) @ apply_rotary(k, cos[shift:], sin[shift:]).T  # 5..n+4
    torch.testing.assert_close(shifted, scores, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores, q @ k.T, atol=1e-3)  # but the rotation did change them
    # With one block and no position anywhere, the last query's softmax over its keys would not see their order;
    # swapping two earlier events changes the last state only because rotary puts positions into q and k.
    one = tiny(model="llama", blocks=1)
    with torch.no_grad():  # GPT-2 init makes every attention near-uniform: sharpen it so that order can matter
        one.encoder.blocks[0].attn.qkv.weight.mul_(30)
    assert not torch.allclose(encode(one, [[4, 9, 2, 7]])[-1], encode(one, [[9, 4, 2, 7]])[-1], atol=1e-4)


# ----------------------------------------------------------------------------------------------------- sizes


def test_feed_forward_widths_and_non_embedding_parameters() -> None:
    D, L = SIZES["dim"], SIZES["blocks"]
    gpt, llama, sasrec = tiny(model="gpt"), tiny(model="llama"), tiny(model="sasrec")
    assert gpt.encoder.blocks[0].mlp.fc.out_features == 4 * D  # ffn_dim 0: each backbone's own width
    assert llama.encoder.blocks[0].mlp.gate.out_features == swiglu_width(D) == 48  # 8 * 16 / 3 = 42.7 -> 48
    assert sasrec.encoder.blocks[0].ffn.fc1.out_features == D  # SASRec's meaning of 0, unchanged
    assert tiny(model="gpt", ffn_dim=24).encoder.blocks[0].mlp.fc.out_features == 24
    # GPT-2's count: per block 12 D^2 + 13 D (attention 4D^2 + 4D, MLP 8D^2 + 5D, two LayerNorms 4D), final LN 2D
    assert gpt.non_embedding_params() == L * (12 * D * D + 13 * D) + 2 * D
    tables = ITEMS + 1 + NUM_EVENT_TYPES  # item rows (0: padding) + event-type rows
    total = sum(p.numel() for p in gpt.parameters())
    assert total - gpt.non_embedding_params() == tables * D + SIZES["max_len"] * D  # tables and positions only
    # the feedback head counts: it computes, it is not a table
    argus = tiny(model="llama", feedback_weight=0.5)
    head = sum(p.numel() for p in argus.feedback_head.parameters())
    assert argus.non_embedding_params() == sum(p.numel() for p in argus.encoder.parameters()) + head


# ----------------------------------------------------------------------------------------------------- HSTU ablations


def test_each_ablation_removes_its_ingredient_and_its_parameters() -> None:
    published = tiny(model="hstu")
    state = published.state_dict()
    D, L, h = SIZES["dim"], SIZES["blocks"], SIZES["heads"]
    dv, T = D // h, published.cfg.num_time_buckets
    out = encode(published, [[3, 7, 1, 9, 4]])
    for name, keys in VARIANTS.items():
        if keys["model"] != "hstu":
            continue
        ablated = tiny(**keys)
        removed = published.non_embedding_params() - ablated.non_embedding_params()
        expected = {"hstu-no-rab": L * (SIZES["max_len"] + T + 1),  # w_pos over offsets, w_time over buckets
                    "hstu-softmax": 0,
                    "hstu-no-gating": L * D * h * dv}[name]  # the U columns of W_uvqk
        assert removed == expected, name
        assert any(".rab." in k for k in ablated.state_dict()) == (name != "hstu-no-rab")
        if name == "hstu-softmax":  # same weights, drawn the same: only the attention differs
            assert all(torch.equal(v, state[k]) for k, v in ablated.state_dict().items())
        assert not torch.allclose(encode(ablated, [[3, 7, 1, 9, 4]]), out, atol=1e-4), name


def reference_block(block: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, tq: torch.Tensor) -> torch.Tensor:
    """One HSTU block on one sequence x [n, D], written out as base.yaml's comments state it."""
    cfg = block.cfg
    n = x.shape[0]
    u, v, q, k = block.project(x)
    q, k, v = q.view(n, cfg.heads, -1), k.view(n, cfg.heads, -1), v.view(n, cfg.heads, -1)
    scores = torch.einsum("ihd,jhd->hij", q, k)  # [h, n, n]
    if cfg.attention == "softmax":
        scores = scores / math.sqrt(cfg.attn_dim)
    if cfg.rab:
        i = torch.arange(n)
        scores = scores + block.rab.pos_w[(i[:, None] - i[None, :]).clamp(min=0)] \
            + block.rab.time_w[bucketize_time_gap(tq[:, None] - t[None, :], cfg.num_time_buckets)]
    causal = torch.ones(n, n).tril().bool()
    if cfg.attention == "silu":
        a = F.silu(scores) / cfg.max_len * causal
    else:
        a = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        torch.testing.assert_close(a.sum(-1), torch.ones(cfg.heads, n))  # weights over the causal keys sum to 1
    return block.output(x, u, torch.einsum("hij,jhd->ihd", a, v).reshape(n, -1))


@pytest.mark.parametrize("rab", [True, False])
@pytest.mark.parametrize("attention", ["silu", "softmax"])
@pytest.mark.parametrize("gating", [True, False])
def test_the_hstu_block_computes_its_formula_under_every_switch(rab: bool, attention: str, gating: bool) -> None:
    torch.manual_seed(1)
    cfg = model_config(model="hstu", hstu_rab=rab, hstu_attention=attention, hstu_gating=gating, blocks=1)
    hstu: HSTU = cfg.encoder().eval()
    lengths = [5, 3]  # two sequences: the stack pads the second
    x = torch.randn(sum(lengths), cfg.dim)
    t = torch.tensor([0, 30, 400, 9_000, 90_000, 10, 20, 5_000])
    tq = torch.cat([t[1:5], torch.tensor([100_000]), t[6:8], torch.tensor([6_000])])
    offsets = torch.tensor([0, 5, 8])
    with torch.no_grad():
        got = hstu(x, offsets, t, tq)
        want = torch.cat([reference_block(hstu.blocks[0], x[a:b], t[a:b], tq[a:b]) for a, b in ((0, 5), (5, 8))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_saved_before_the_switches_loads_as_the_published_hstu(tmp_path: Path) -> None:
    published = tiny(model="hstu")
    rec = Recommender(published, ItemVocab.build(np.arange(1, ITEMS + 1)))
    path = rec.save(tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    for key in PUBLISHED_HSTU:
        del config["model"][key]  # what an older version wrote
    (path / "config.json").write_text(json.dumps(config))
    loaded = Recommender.load(path)
    assert (loaded.config.hstu_rab, loaded.config.hstu_attention, loaded.config.hstu_gating) == (True, "silu", True)
    assert loaded.config == published.cfg
    history = [{"item_ids": [1, 4, 9, 2], "timestamps_ms": [T0_MS + 1000 * i for i in range(4)]}]
    assert loaded.recommend(history, k=5) == rec.recommend(history, k=5)
    # only the ablation keys fall back: any other missing key still asks for a retrain
    old = {k: v for k, v in dataclasses.asdict(published.cfg).items() if k not in ("hstu_rab", "dim")}
    with pytest.raises(ValueError, match=r"lacks \['dim'\]"):
        ModelConfig.from_dict(old)


def test_the_published_defaults_and_the_new_names_in_every_recipe_road() -> None:
    cfg = resolve_recipe(BASE_RECIPE)
    assert {k: getattr(cfg, k) for k in PUBLISHED_HSTU} == PUBLISHED_HSTU  # base.yaml's defaults: the paper's
    assert (resolve_recipe("gpt").model, resolve_recipe("llama").model) == ("gpt", "llama")
    with pytest.raises(ValueError, match="hstu_attention 'linear': expected one of silu, softmax"):
        resolve_recipe(BASE_RECIPE, hstu_attention="linear")
    with pytest.raises(ValueError, match="even dim // heads"):
        resolve_recipe(BASE_RECIPE, model="llama", dim=24, heads=8)  # head width 3: no rotary pairs
    assert resolve_recipe(BASE_RECIPE, hstu_gating="false").hstu_gating is False  # text from the environment
    from models.scaling import grid, point_recipe

    points = grid(ScalingSettings(backbones=["gpt", "llama"], sizes=["d8b1", "d16b1", "d32b2"], seeds=[0]))
    assert {point_recipe(p, BASE_RECIPE).model for p in points} == {"gpt", "llama"}  # the scaling study's road
