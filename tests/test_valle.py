"""VALL-E (models/audio/tts/valle.py): losses, padding invariance, KV cache, generation."""

from __future__ import annotations

import pytest
import torch

import models.audio.tts  # noqa: F401 - registers valle
from models import build_network, load_network
from models.audio.tts.valle import VALLE
from models.audio.tts.valle_layers import filter_logits, penalize_repeats
from utils.io import save_network
from utils.schema import Problems, bind_options

TINY = dict(
    n_phonemes=20, codebook_size=16, n_levels=3, d_model=32, n_layers=2, n_heads=2, dropout=0.0
)
K = TINY["codebook_size"]


def tiny(**kw) -> VALLE:
    torch.manual_seed(0)
    return VALLE(**{**TINY, **kw}).eval()


def make_batch(seed: int = 0, levels: int = 3) -> dict[str, torch.Tensor]:
    """Three items of different phoneme, prompt (one empty) and target lengths, padded with 0."""
    g = torch.Generator().manual_seed(seed)
    pl, ql, cl = torch.tensor([7, 4, 5]), torch.tensor([6, 0, 3]), torch.tensor([9, 5, 2])
    phonemes = torch.randint(3, TINY["n_phonemes"], (3, 7), generator=g)
    prompt = torch.randint(0, K, (3, levels, 6), generator=g)
    codes = torch.randint(0, K, (3, levels, 9), generator=g)
    for b in range(3):  # padding is 0, as the collate writes it
        phonemes[b, pl[b] :] = 0
        prompt[b, :, ql[b] :] = 0
        codes[b, :, cl[b] :] = 0
    return dict(
        phonemes=phonemes,
        phoneme_lengths=pl,
        prompt=prompt,
        prompt_lengths=ql,
        codes=codes,
        code_lengths=cl,
    )


def item(batch: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Item b alone, trimmed to its own lengths."""
    p, q, t = (int(batch[k][b]) for k in ("phoneme_lengths", "prompt_lengths", "code_lengths"))
    return dict(
        phonemes=batch["phonemes"][b : b + 1, :p],
        phoneme_lengths=batch["phoneme_lengths"][b : b + 1],
        prompt=batch["prompt"][b : b + 1, :, :q],
        prompt_lengths=batch["prompt_lengths"][b : b + 1],
        codes=batch["codes"][b : b + 1, :, :t],
        code_lengths=batch["code_lengths"][b : b + 1],
    )


def prefix(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("phonemes", "phoneme_lengths", "prompt", "prompt_lengths")}


def test_forward_returns_finite_losses_and_gradients_reach_embeddings():
    model = tiny().train()
    out = model(**make_batch())
    assert set(out) == {"loss_ar", "loss_nar", "acc_ar", "acc_nar"}
    for key, value in out.items():
        assert value.shape == () and torch.isfinite(value), key
    assert not out["acc_ar"].requires_grad and out["acc_ar"].dtype == torch.float32
    (out["loss_ar"] + out["loss_nar"]).backward()
    for name in (
        "phoneme_emb.weight",
        "code_embs.0.weight",
        "code_embs.1.weight",
        "start",
        "task_emb.weight",
        "ar_head.weight",
        "nar_weight",
        "trunks.0.blocks.0.attn.qkv.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_reference_size_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = VALLE(n_layers=12, d_model=1024, n_heads=16, n_levels=8, codebook_size=1024)
    n = sum(p.numel() for p in model.parameters())
    assert 150e6 < n < 200e6, n


@pytest.mark.slow
def test_overfits_one_batch():
    model = tiny().train()
    batch = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = {k: v.item() for k, v in model(**batch).items()}
    for _ in range(30):
        out = model(**batch)
        opt.zero_grad()
        (out["loss_ar"] + out["loss_nar"]).backward()
        opt.step()
    last = model(**batch)
    assert last["loss_ar"] < 0.5 * first["loss_ar"]
    assert last["loss_nar"] < 0.5 * first["loss_nar"]
    assert last["acc_ar"] > first["acc_ar"]


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("segment", [False, True])
def test_padding_changes_no_items_loss(positions, shared, segment):
    model = tiny(positions=positions, shared_weights=shared, segment_positions=segment)
    batch = make_batch()
    for level in (1, 2):
        together = model.item_losses(**batch, nar_level=level)
        for b in range(3):
            alone = model.item_losses(**item(batch, b), nar_level=level)
            for name in ("ar", "nar"):
                assert together[f"{name}_count"][b] == alone[f"{name}_count"][0]
                mean = together[f"{name}_loss"][b] / together[f"{name}_count"][b]
                torch.testing.assert_close(
                    mean, alone[f"{name}_loss"][0] / alone[f"{name}_count"][0], atol=1e-5, rtol=1e-5
                )


def test_loss_is_token_mean_over_the_batch():
    model = tiny()
    batch = make_batch()
    sums = model.item_losses(**batch, nar_level=2)
    out = model(**batch, _nar_level=2)
    # AR targets are the frames plus one stop per item
    assert sums["ar_count"].tolist() == (batch["code_lengths"] + 1).tolist()
    torch.testing.assert_close(out["loss_ar"], sums["ar_loss"].sum() / sums["ar_count"].sum())
    torch.testing.assert_close(out["loss_nar"], sums["nar_loss"].sum() / sums["nar_count"].sum())


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("segment", [False, True])
def test_cached_logits_match_uncached(positions, segment):
    model = tiny(positions=positions, segment_positions=segment)
    if segment:  # scales unlike each other and large, so a wrong segment index shows
        model.segment_scale.data = torch.tensor([0.5, 1.0, 2.0])
    batch = make_batch()
    codes0, lengths = batch["codes"][:, 0], batch["code_lengths"]
    full = model.ar_logits(**prefix(batch), codes0=codes0, code_lengths=lengths)  # [B, T+1, V]
    assert full.shape == (3, codes0.shape[1] + 1, K + 1)
    logits, cache = model.ar_prefill(**prefix(batch), capacity=codes0.shape[1])
    steps = [logits]
    for t in range(codes0.shape[1]):
        steps.append(model.ar_step(codes0[:, t], cache))
    cached = torch.stack(steps, dim=1)  # [B, T+1, V]
    for b in range(3):
        n = int(lengths[b]) + 1  # frames and the stop; later positions are padding
        torch.testing.assert_close(cached[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)


def test_generate_with_and_without_cache_agree():
    model = tiny()
    batch = prefix(make_batch())
    for kw in (
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=8, top_p=0.9, repetition_penalty=1.3, nar_temperature=0.7),
    ):
        a = model.generate(
            **batch, max_frames=12, use_cache=True, generator=torch.Generator().manual_seed(1), **kw
        )
        b = model.generate(
            **batch,
            max_frames=12,
            use_cache=False,
            generator=torch.Generator().manual_seed(1),
            **kw,
        )
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def force_stops(model: VALLE, stop_at: list[int]):
    """Make item b emit the stop at step stop_at[b] (-1: never), via a hook on the AR head
    (called once per step: [B, V] from the cache, [B, T, V] of which the last counts without)."""
    calls = {"step": 0}
    when = torch.tensor(stop_at)

    def hook(module, args, out):
        stop = when == calls["step"]
        calls["step"] += 1
        out = out.clone()
        out[..., K] = torch.where(stop, 1e4, -1e4).view(-1, *[1] * (out.dim() - 2))
        return out

    return model.ar_head.register_forward_hook(hook)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_stops_each_item_on_its_own(use_cache):
    model = tiny()
    batch = prefix(make_batch())
    handle = force_stops(model, [3, 7, -1])
    codes, lengths = model.generate(**batch, max_frames=10, temperature=0.0, use_cache=use_cache)
    handle.remove()
    assert lengths.tolist() == [3, 7, 10]
    assert codes.shape == (3, TINY["n_levels"], 10) and codes.dtype == torch.long
    for b, n in enumerate(lengths.tolist()):
        assert (codes[b, :, n:] == 0).all()
    # each item alone generates the same frames as in the batch
    for b, stop in enumerate([3, 7, -1]):
        handle = force_stops(model, [stop])
        alone, n = model.generate(
            **prefix(item(make_batch(), b)), max_frames=10, temperature=0.0, use_cache=use_cache
        )
        handle.remove()
        assert n.item() == lengths[b] and torch.equal(alone[0], codes[b, :, : n.item()])


def test_all_stopped_ends_early_and_trims():
    model = tiny()
    handle = force_stops(model, [2, 4, 1])
    codes, lengths = model.generate(**prefix(make_batch()), max_frames=50)
    handle.remove()
    assert lengths.tolist() == [2, 4, 1] and codes.shape[-1] == 4


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny()
    batch = prefix(make_batch())
    greedy = model.generate(**batch, max_frames=8, temperature=0.0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = model.generate(
            **batch, max_frames=8, temperature=1.0, generator=torch.Generator().manual_seed(3), **kw
        )
        assert torch.equal(sampled[0], greedy[0]) and torch.equal(sampled[1], greedy[1])


def test_sampling_is_seeded_by_the_generator():
    model = tiny()
    batch = prefix(make_batch())

    def run(seed):
        return model.generate(
            **batch,
            max_frames=16,
            nar_temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
        )[0]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_filters_and_repetition_penalty():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.23, 0.09, 0.03, 0.004]
    kept = filter_logits(logits, top_p=float(probs[0] + probs[1]) - 1e-3).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    seen = torch.tensor([[True, False, False, False, True]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[2.0, 3.0, 2.0, 1.0, -2.0]]


def test_generate_restores_training_mode_and_validates_arguments():
    model = tiny().train()
    model.generate(**prefix(make_batch()), max_frames=3)
    assert model.training
    with pytest.raises(ValueError, match="top_p"):
        model.generate(**prefix(make_batch()), max_frames=3, top_p=0.0)


def test_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model = tiny(checkpointing=checkpointing, dropout=0.1).train()
        torch.manual_seed(42)  # same dropout masks and NAR levels in both runs
        out = model(**make_batch())
        (out["loss_ar"] + out["loss_nar"]).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], msg=name)


def test_separate_trunks_have_more_parameters_and_train_both():
    shared, separate = tiny(), tiny(shared_weights=False).train()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(separate) > count(shared)
    out = separate(**make_batch())
    (out["loss_ar"] + out["loss_nar"]).backward()
    for trunk in separate.trunks:
        assert trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    codes, lengths = separate.generate(**prefix(make_batch()), max_frames=5)
    assert codes.shape[:2] == (3, TINY["n_levels"])


def test_learned_positions_work_and_refuse_overlong_items():
    model = tiny(positions="learned", max_positions=32)
    batch = make_batch()  # longest item: 7 + 6 + 1 + 9 = 23 positions
    assert torch.isfinite(model(**batch)["loss_ar"])
    with pytest.raises(ValueError, match="max_positions is 32"):
        model(
            **{
                **batch,
                "codes": torch.zeros(3, 3, 20, dtype=torch.long),
                "code_lengths": torch.tensor([20, 1, 1]),
            }
        )
    with pytest.raises(ValueError, match="max_positions"):
        model.generate(**prefix(batch), max_frames=30)


def test_bad_inputs_fail_with_clear_messages():
    model = tiny()
    batch = make_batch()
    with pytest.raises(ValueError, match="codebook_size 16"):
        model(**{**batch, "codes": batch["codes"] + K})
    with pytest.raises(ValueError, match="n_phonemes 20"):
        model(**{**batch, "phonemes": batch["phonemes"] + 20})
    with pytest.raises(ValueError, match="levels >= 3"):
        model(**{**batch, "codes": batch["codes"][:, :2]})
    with pytest.raises(ValueError, match="even size"):
        VALLE(d_model=30, n_heads=4)


def test_extra_data_levels_are_ignored():
    model = tiny()
    batch = make_batch(levels=5)
    trimmed = {**batch, "codes": batch["codes"][:, :3], "prompt": batch["prompt"][:, :3]}
    torch.testing.assert_close(model(**batch, _nar_level=1), model(**trimmed, _nar_level=1))


def test_built_and_validated_through_the_framework(tmp_path):
    model = build_network("valle", dict(TINY))
    assert isinstance(model, VALLE)
    problems = Problems()
    kwargs = bind_options(
        VALLE, {**TINY, "d_modle": 64, "positions": "rotary"}, "networks.valle.kwargs", problems
    )
    messages = "\n".join(f"{p}: {m}" for p, m in problems.items)
    assert "networks.valle.kwargs.d_modle: unknown option (did you mean 'd_model'?)" in messages
    assert "networks.valle.kwargs.positions: expected one of 'rope', 'learned'" in messages
    assert kwargs["n_levels"] == 3
    # the kwargs go into the checkpoint as JSON and rebuild the same network
    path = tmp_path / "valle.safetensors"
    save_network(model, path, which_model="valle", kwargs=dict(TINY))
    loaded = load_network(path).eval()
    batch = make_batch()
    torch.testing.assert_close(loaded(**batch, _nar_level=1), model.eval()(**batch, _nar_level=1))


def test_segment_positions_restart_in_each_segment():
    from models.audio.tts.valle import sinusoids

    model = tiny(segment_positions=True)
    model.segment_scale.data = torch.tensor([1.0, 2.0, 3.0])
    starts = [torch.tensor([0, 0]), torch.tensor([3, 2]), torch.tensor([5, 2])]
    lengths = [torch.tensor([3, 2]), torch.tensor([2, 0]), torch.tensor([2, 4])]
    pos = model._segment_positions(starts, lengths, 7)  # [2, 7, D]
    want_index = [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 0]]
    want_scale = [[1, 1, 1, 2, 2, 3, 3], [1, 1, 3, 3, 3, 3, 1]]  # item 1: no prompt, then pad
    for b in range(2):
        for j in range(7 if b == 0 else 6):
            torch.testing.assert_close(
                pos[b, j], want_scale[b][j] * sinusoids(torch.tensor(want_index[b][j]), 32)
            )
    # the scale is learned: a training step moves it
    batch = make_batch()
    model.train()
    model(**batch)["loss_ar"].backward()
    assert model.segment_scale.grad is not None and model.segment_scale.grad.abs().sum() > 0


def test_ar_input_noise_changes_training_inputs_only():
    batch = make_batch()
    clean = tiny()
    noisy = tiny(ar_input_noise=0.5)
    noisy.load_state_dict(clean.state_dict())
    args = dict(**prefix(batch), codes0=batch["codes"][:, 0], code_lengths=batch["code_lengths"])
    # eval mode (validation, generation): no noise, the same logits
    torch.testing.assert_close(noisy.ar_logits(**args), clean.ar_logits(**args))
    noisy.train()
    torch.manual_seed(1)
    train_logits = noisy.ar_logits(**args)
    # position 0 sees only the prefix; later positions see (partly) replaced inputs
    torch.testing.assert_close(train_logits[:, 0], clean.ar_logits(**args)[:, 0])
    assert not torch.allclose(train_logits[:, 1:], clean.ar_logits(**args)[:, 1:])
    with pytest.raises(ValueError, match="ar_input_noise"):
        VALLE(**{**TINY, "ar_input_noise": 1.0})
